"""Guards issue 18, points 1, 2 and 4: the project's processes, locks, memory and files work on
Windows and macOS too. This machine is Linux, so the branches only those systems take (process
groups, Ctrl-Break, the Job Object, replace retries, peak working set, ru_maxrss in bytes) run here
with the OS calls faked; the rest runs for real. The suite's `platforms` tests run once more in
foreign-platform mode (tests/foreign/sitecustomize.py, .ci/run)."""

from __future__ import annotations

import ast
import ctypes
import errno
import os
import signal
import subprocess
import sys
import types
from collections import namedtuple
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.jobfile import job as jobfile
from orchestrator.executors import runner
from stages import entry, files, lifeline, measure
from stages.contract import JobFileError, ResourceError
from stages.locks import exclusive_lock, read_holder, stage_lock
from stages.resolved import slugify, windows_reserved
from stages.units import Unit

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.platforms


# ---------------------------------------------------------------------------------------------
# Point 1: locks (filelock), memory (psutil), the lifeline, signals


def test_shared_holders_run_side_by_side_and_keep_an_exclusive_one_out(tmp_path):
    """Built from exclusive OS locks only (filelock has no shared one that dies with its holder).
    flock locks belong to open files, so one process can play every party."""
    lock = tmp_path / "denoise" / ".lock"
    with exclusive_lock(lock, "stage denoise", shared=True), exclusive_lock(lock, "stage denoise", shared=True):
        with pytest.raises(JobFileError, match=rf"stage denoise is already running \(pid {os.getpid()}, lock .*shared-"):
            with exclusive_lock(lock, "stage denoise"):
                pass
    with exclusive_lock(lock, "stage denoise"):
        assert read_holder(lock) == str(os.getpid())  # beside the lock: Windows cannot read a locked byte
        with pytest.raises(JobFileError, match=rf"already running \(pid {os.getpid()}, lock {lock}\)"):
            with exclusive_lock(lock, "stage denoise", shared=True):
                pass
    assert read_holder(lock) == "" and sorted(p.name for p in lock.parent.iterdir()) == [".lock"]  # slots and pid gone


def test_a_unit_is_made_by_one_process_only(tmp_path):
    unit = Unit("denoise", "0001-a-cat", {})
    with stage_lock(tmp_path, "denoise", [unit]):
        with pytest.raises(JobFileError, match=rf"unit 0001-a-cat is being made by another process \(pid {os.getpid()}"):
            with stage_lock(tmp_path, "denoise", [Unit("denoise", "0002-a-dog", {}), unit]):
                pass
        with stage_lock(tmp_path, "denoise", [Unit("denoise", "0002-a-dog", {})]):
            pass
    with stage_lock(tmp_path, "denoise", [unit]):  # released
        pass


class FakeMemory:
    def __init__(self, **fields) -> None:
        self.fields = fields

    def memory_info(self):
        return namedtuple("pmem", self.fields)(**self.fields)


def _no_proc(monkeypatch):
    """As on Windows and macOS: no /proc."""
    real = measure.Path

    def path(p, *rest):
        if str(p).startswith("/proc"):
            return real("/nonexistent-proc") / str(p).lstrip("/")
        return real(p, *rest)

    monkeypatch.setattr(measure, "Path", path)


def test_peak_memory_is_the_peak_working_set_on_windows(monkeypatch):
    import psutil

    _no_proc(monkeypatch)
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(psutil, "Process", lambda: FakeMemory(rss=100, peak_wset=5000))
    monkeypatch.setitem(sys.modules, "resource", None)  # Windows has none: importing it raises
    assert measure.peak_rss() == 5000
    assert measure.current_rss() == 100


@pytest.mark.parametrize(("platform", "maxrss", "expected"), [("darwin", 7_000_000, 7_000_000), ("linux", 7_000, 7_168_000)])
def test_ru_maxrss_is_bytes_on_macos_and_kib_on_linux(monkeypatch, platform, maxrss, expected):
    import psutil

    _no_proc(monkeypatch)
    monkeypatch.setattr(sys, "platform", platform)
    monkeypatch.setattr(psutil, "Process", lambda: FakeMemory(rss=100))
    fake = types.SimpleNamespace(RUSAGE_SELF=0, getrusage=lambda who: types.SimpleNamespace(ru_maxrss=maxrss))
    monkeypatch.setitem(sys.modules, "resource", fake)
    import builtins  # macOS and Linux have `resource`: lift foreign-platform mode's Windows guard

    monkeypatch.setattr(builtins, "__import__", getattr(builtins.__import__, "real_import", builtins.__import__))
    assert measure.peak_rss() == expected


def test_memory_is_measured_for_real_here():
    assert measure.current_rss() > 10 << 20 and measure.peak_rss() >= measure.current_rss() // 2


class FakeThread:
    started: list = []

    def __init__(self, target, name, daemon) -> None:
        self.target = target

    def start(self) -> None:
        FakeThread.started.append(self.target)


class Exited(Exception):
    pass


def _fake_exit(code):
    raise Exited(code)


def test_a_stage_watches_the_orchestrator_pid_it_was_given_not_its_parent(monkeypatch):
    """Windows: a venv's python.exe is a launcher, so the stage's parent is the launcher. The pid
    given is watched (pid and start time, psutil), and the stage joins the orchestrator's Job Object."""
    joined = []
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.delattr(signal, "SIGKILL")
    monkeypatch.setattr(lifeline, "join_stage_job", joined.append)
    monkeypatch.setattr(lifeline.threading, "Thread", FakeThread)
    monkeypatch.setattr(lifeline.os, "_exit", _fake_exit)
    orchestrator = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        monkeypatch.setenv(lifeline.ENV, str(orchestrator.pid))  # not our parent: pytest is
        FakeThread.started.clear()
        assert lifeline.bind_to_parent() == "watch" and joined == [orchestrator.pid]
        assert lifeline.ENV not in os.environ
        (watch,) = FakeThread.started
        monkeypatch.setattr(lifeline._stop, "wait", lambda timeout: False)
    finally:
        orchestrator.stdin.close()
        orchestrator.wait(10)
    with pytest.raises(Exited, match=str(lifeline.EXIT_ORPHANED)):
        watch()  # the orchestrator is gone: the stage exits
    monkeypatch.setenv(lifeline.ENV, str(orchestrator.pid))
    with pytest.raises(Exited):  # already gone when the stage starts
        lifeline.bind_to_parent()


class FakeKernel32:
    """The kernel32 calls lifeline makes, recorded."""

    def __init__(self) -> None:
        self.calls = []

    def __getattr__(self, name):
        def call(*args):
            self.calls.append((name, args))
            return {"CreateJobObjectW": 41, "OpenJobObjectW": 42, "GetCurrentProcess": -1}.get(name, 1)

        return call


def test_the_orchestrator_makes_one_kill_on_close_job_object_and_a_stage_joins_it(monkeypatch):
    kernel32 = FakeKernel32()
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(lifeline, "_kernel32", lambda: kernel32)
    monkeypatch.setattr(lifeline, "_JOB_HANDLE", [])
    assert lifeline.create_stage_job() == 41 and lifeline.create_stage_job() == 41  # once per orchestrator
    (create, configure) = kernel32.calls
    assert create == ("CreateJobObjectW", (None, f"Local\\pixart-lowmem-stages-{os.getpid()}"))
    name, (handle, info_class, info, size) = configure
    limits = info._obj  # the ctypes.byref'd JOBOBJECT_EXTENDED_LIMIT_INFORMATION
    assert (name, handle, info_class) == ("SetInformationJobObject", 41, 9)
    assert limits.BasicLimitInformation.LimitFlags == 0x2000  # JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE
    assert size == ctypes.sizeof(limits) == (144 if ctypes.sizeof(ctypes.c_void_p) == 8 else 112)  # winnt.h's layout
    kernel32.calls.clear()
    assert lifeline.join_stage_job(1234)
    assert kernel32.calls == [("OpenJobObjectW", (lifeline.JOB_OBJECT_ALL_ACCESS, False, "Local\\pixart-lowmem-stages-1234")),
                              ("GetCurrentProcess", ()), ("AssignProcessToJobObject", (42, -1)), ("CloseHandle", (42,))]
    monkeypatch.setattr(sys, "platform", "linux")
    assert lifeline.create_stage_job() is None  # elsewhere nothing is made


class FakeProcess:
    def __init__(self, *args, **kwargs) -> None:
        self.args, self.kwargs, self.signals = args, kwargs, []

    def send_signal(self, signum) -> None:
        self.signals.append(signum)

    def wait(self, timeout=None) -> int:
        return 0


def test_stages_get_their_own_process_group_and_ctrl_break_on_windows(monkeypatch, tmp_path):
    """send_signal(SIGINT) raises on Windows: each stage is started in a new process group, and
    told to stop with CTRL_BREAK_EVENT, which it handles as Ctrl-C."""
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x200, raising=False)
    monkeypatch.setattr(signal, "CTRL_BREAK_EVENT", 1, raising=False)
    monkeypatch.setattr(lifeline, "create_stage_job", lambda: 41)
    monkeypatch.setattr(runner.subprocess, "Popen", FakeProcess)
    for wait in (False, True):
        process = runner.start_stage("denoise", tmp_path, force=False, wait=wait)
        assert process.kwargs["creationflags"] == 0x200 and "start_new_session" not in process.kwargs
        assert process.kwargs["encoding"] == "utf-8" and process.kwargs["env"][lifeline.ENV] == str(os.getpid())
    runner._interrupt(process)
    assert process.signals == [1]
    assert lifeline.was_interrupted(0xC000013A, 130)  # STATUS_CONTROL_C_EXIT
    monkeypatch.setattr(sys, "platform", "linux")
    assert lifeline.popen_options(new_session=True) == {"start_new_session": True}
    runner._interrupt(process)
    assert process.signals == [1, signal.SIGINT]
    assert not lifeline.was_interrupted(0xC000013A, 130) and lifeline.was_interrupted(-signal.SIGINT, 130)


def test_only_the_signals_a_platform_has_are_handled(monkeypatch):
    from orchestrator import cli

    monkeypatch.delattr(signal, "SIGHUP")
    monkeypatch.setattr(signal, "SIGBREAK", 21, raising=False)
    assert entry.stop_signals() == (signal.SIGINT, signal.SIGTERM, 21)
    handled = []
    monkeypatch.setattr(cli.signal, "signal", lambda signum, handler: handled.append((signum, handler)))
    monkeypatch.setattr(cli, "app", lambda: None)
    cli.main()
    # handled while the command runs; ignored once it has returned (interpreter shutdown)
    assert handled == [(signal.SIGTERM, cli._terminate), (21, cli._terminate), (signal.SIGTERM, signal.SIG_IGN), (21, signal.SIG_IGN)]


# ---------------------------------------------------------------------------------------------
# Point 2: files


def test_replace_retries_while_another_process_holds_the_target_on_windows(monkeypatch, tmp_path):
    target = tmp_path / "0001-a-cat.json"
    target.write_bytes(b"old")
    real_replace, refusals, slept = os.replace, [2], []

    def replace(source, destination):
        if refusals[0]:
            refusals[0] -= 1
            raise PermissionError(errno.EACCES, "The process cannot access the file because it is being used by another process")
        real_replace(source, destination)

    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(files.os, "replace", replace)
    monkeypatch.setattr(files.time, "sleep", slept.append)
    files.publish_bytes(target, b"new")
    assert target.read_bytes() == b"new" and slept == [0.05, 0.1]
    refusals[0] = 99  # held for good: one line, the old file kept, no temporary file left
    with pytest.raises(ResourceError, match=r"could not replace .*0001-a-cat.json: another program keeps it open"):
        files.publish_bytes(target, b"newer")
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == [target.name]
    assert slept[2:] == list(files.REPLACE_RETRY_DELAYS_S)


def test_a_permission_error_is_not_retried_where_it_is_real(monkeypatch, tmp_path):
    slept = []
    monkeypatch.setattr(files.os, "replace", lambda a, b: (_ for _ in ()).throw(PermissionError(errno.EACCES, "Permission denied")))
    monkeypatch.setattr(files.time, "sleep", slept.append)
    with pytest.raises(ResourceError, match="Permission denied; free disk space or fix the folder"):
        files.publish_bytes(tmp_path / "x.json", b"x")
    assert slept == []


def test_fsync_goes_through_a_writable_handle_and_no_folder_fsync_on_windows(monkeypatch, tmp_path):
    """Windows' FlushFileBuffers refuses a read-only handle and a folder cannot be opened at all."""
    opened, real_open = [], os.open

    def fake_open(path, flags, *args):
        opened.append((Path(path), flags))
        if Path(path).is_dir() and sys.platform == "win32":
            raise PermissionError(errno.EACCES, "Access is denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(files.os, "open", fake_open)
    files.publish(tmp_path / "a.png", lambda tmp: Path(tmp).write_bytes(b"png"))  # a writer we do not own (PIL)
    (tmp, flags), (folder, _) = opened
    assert tmp.name.startswith(".tmp-") and flags & os.O_ACCMODE == os.O_RDWR and folder == tmp_path
    monkeypatch.setattr(sys, "platform", "win32")
    opened.clear()
    files.publish_bytes(tmp_path / "b.json", b"{}")
    assert [path.name for path, _ in opened] == [f".tmp-{os.getpid()}-b.json"]  # the file only, never the folder
    assert (tmp_path / "b.json").read_bytes() == b"{}"


@pytest.mark.parametrize(("code", "kept"), [(errno.EINVAL, True), (errno.EIO, False)])
def test_a_folder_fsync_the_filesystem_refuses_is_skipped_but_a_real_error_is_not(monkeypatch, tmp_path, code, kept):
    real_fsync = os.fsync

    def fsync(fd):
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(code, os.strerror(code))
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    if kept:
        files.publish_bytes(tmp_path / "a.json", b"{}")
    else:
        with pytest.raises(ResourceError, match="Input/output error"):
            files.publish_bytes(tmp_path / "a.json", b"{}")


def test_paths_are_shown_relative_only_when_they_can_be(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert files.shown_path(tmp_path / "job" / "decode") == os.path.join("job", "decode")

    def across_drives(path, start=None):
        raise ValueError("path is on mount 'D:', start on mount 'C:'")

    monkeypatch.setattr(files.os.path, "relpath", across_drives)
    assert files.shown_path(tmp_path / "job") == str(tmp_path / "job")
    assert runner._shown(runner.stage_command("decode", tmp_path / "job")) == f"python -m stages.decode {tmp_path / 'job'}"


JOB = """
[job]
{name}
model = "some/model"

[[generation]]
prompt = "a cat"
"""


@pytest.mark.parametrize("name", ["con", "NUL", "Aux.job", "com1", "LPT9.tar.gz", "prn", "night."])
def test_job_names_windows_refuses_are_refused_in_one_line(tmp_path, name):
    job_file = tmp_path / "job.toml"
    job_file.write_text(JOB.format(name=f'name = "{name}"'), encoding="utf-8")
    with pytest.raises(JobFileError) as caught:
        jobfile.load_job(job_file)
    message = str(caught.value)
    assert f"name {name!r}" in message and "choose another" in message and "\n" not in message
    stem = tmp_path / f"{name.rstrip('.')}.toml"  # from the file name alike
    stem.write_text(JOB.format(name=""), encoding="utf-8")
    if windows_reserved(stem.stem):
        with pytest.raises(JobFileError, match="Windows reserves"):
            jobfile.load_job(stem)


def test_a_job_name_that_differs_only_in_case_from_a_job_folder_is_refused(tmp_path):
    (tmp_path / "work" / "Beach").mkdir(parents=True)
    job_file = tmp_path / "job.toml"
    job_file.write_text(JOB.format(name='name = "beach"'), encoding="utf-8")
    job = jobfile.load_job(job_file)
    with pytest.raises(JobFileError, match=r"job name 'beach' differs only in case from the job folder 'Beach' in .*work; set"):
        jobfile.job_dir_for(job, tmp_path / "work")
    (tmp_path / "work" / "Beach").rename(tmp_path / "work" / "beach")
    assert jobfile.job_dir_for(job, tmp_path / "work") == (tmp_path / "work" / "beach").resolve()


@pytest.mark.parametrize("prompt", ["nul", "CON", "com1", "Lpt3", "aux"])
def test_item_names_from_reserved_words_are_made_safe(prompt):
    assert slugify(prompt) == f"{prompt.lower()}-" and not windows_reserved(slugify(prompt))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_every_prompt_gives_a_slug_windows_accepts(prompt):
    slug = slugify(prompt)
    assert slug and not windows_reserved(slug) and not slug.endswith((".", " "))
    assert set(slug) <= set("abcdefghijklmnopqrstuvwxyz0123456789-")  # one case: no two names differing in case


# ---------------------------------------------------------------------------------------------
# Points 1, 2 and 4 statically: what foreign-platform mode finds when the code runs, over all code


def _project_sources():
    return sorted(ROOT.glob("orchestrator/**/*.py")) + sorted(ROOT.glob("stages/*.py")) + sorted(ROOT.glob("bench/*.py"))


def _keywords(call: ast.Call) -> set[str]:
    return {k.arg for k in call.keywords}


def _text_mode(call: ast.Call, position: int) -> bool:
    mode = call.args[position] if len(call.args) > position else next((k.value for k in call.keywords if k.arg == "mode"), None)
    return mode is None or not (isinstance(mode, ast.Constant) and "b" in str(mode.value))


def default_encoding_calls(source: str) -> list[int]:
    """Lines of text I/O calls without an explicit encoding."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func, kw = node.func, _keywords(node)
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if "encoding" in kw:
            continue
        if name in ("read_text", "write_text", "FileHandler") \
                or (name == "open" and isinstance(func, ast.Name) and _text_mode(node, 1)) \
                or (name == "open" and isinstance(func, ast.Attribute) and func.attr == "open" and _text_mode(node, 0)
                    and not (isinstance(func.value, ast.Name) and func.value.id in ("Image", "os", "webbrowser", "f"))) \
                or (name in ("run", "Popen", "check_output") and ({"text", "universal_newlines"} & kw)) \
                or (name in ("TemporaryFile", "NamedTemporaryFile") and node.args and _text_mode(node, 0)):
            lines.append(node.lineno)
    return lines


def test_every_text_file_is_read_and_written_as_utf8():
    found = {str(p.relative_to(ROOT)): default_encoding_calls(p.read_text(encoding="utf-8")) for p in _project_sources()}
    assert {p: lines for p, lines in found.items() if lines} == {}


def test_the_check_finds_default_encodings():
    assert default_encoding_calls("Path('x').read_text()\nopen(p, 'w')\nopen(p, 'rb')\nsubprocess.run(c, text=True)\n"
                                  "open(p, 'w', encoding='utf-8')\n") == [1, 2, 4]


def test_no_project_module_imports_what_windows_lacks_at_import_time():
    """fcntl, resource and termios: none at module level (measure.py imports resource on macOS only)."""
    found = []
    for path in sorted(ROOT.glob("orchestrator/**/*.py")) + sorted(ROOT.glob("stages/*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.name}: {n}" for n in names if n and n.split(".")[0] in ("fcntl", "resource", "termios")]
    assert found == []


def test_signals_windows_lacks_are_never_named_directly():
    """signal.SIGHUP / SIGKILL / SIGBREAK raise AttributeError where the platform has none."""
    found = []
    for path in sorted(ROOT.glob("orchestrator/**/*.py")) + sorted(ROOT.glob("stages/*.py")):  # bench/ runs on Linux GPU machines
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "signal" \
                    and node.attr in ("SIGHUP", "SIGKILL", "SIGBREAK", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM"):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} signal.{node.attr}")
    assert found == []
