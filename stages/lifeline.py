"""A stage process started by the orchestrator never outlives it, on any OS (issue 11, point 1; issue 18, point 1).

The orchestrator puts its pid in PIXART_ORCHESTRATOR_PID when it starts a stage; importing the
`stages` package (the first thing `python -m stages.X` does, before torch) then binds the process
to that orchestrator: on Linux the kernel sends it SIGKILL when the parent dies (prctl
PR_SET_PDEATHSIG); on every OS but Linux a thread watches the orchestrator's pid every 0.2 s with
psutil (its pid and start time, so a reused pid does not count). The pid is passed explicitly
because a venv's `python.exe` on Windows is a launcher: the stage's parent is the launcher, not the
orchestrator. On Windows the orchestrator also keeps a Job Object with kill-on-close, named after
its pid, which each stage joins: when the orchestrator dies, however, Windows ends the stages.
Whatever kills the orchestrator (SIGKILL, the OOM killer, a closed terminal), its stages go too,
running or waiting, and release their locks and memory; what they finished is kept and a
half-written file is never accepted, as after any kill. A stage started by hand has no such
variable and is unaffected. The variable is removed from the environment once read, so nothing
the stage starts inherits it.

The orchestrator's side lives here too: the flags a stage is started with and how it is told to
stop (Ctrl-C on POSIX; on Windows, where a child cannot be sent SIGINT, CTRL_BREAK_EVENT to the new
process group each stage is started in).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

ENV = "PIXART_ORCHESTRATOR_PID"
EXIT_ORPHANED = 130  # as interrupted: nobody is left to read it
PR_SET_PDEATHSIG = 1
# Windows: what a console process ended by Ctrl-C or Ctrl-Break returns (STATUS_CONTROL_C_EXIT).
STATUS_CONTROL_C_EXIT = 0xC000013A
# Windows API constants (winnt.h): JobObjectExtendedLimitInformation and its kill-on-close flag.
JOB_OBJECT_EXTENDED_LIMIT_INFORMATION = 9
JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE = 0x2000
JOB_OBJECT_ALL_ACCESS = 0x1F001F


def bind_to_parent() -> str | None:
    """Bind this process to the orchestrator named in the environment; returns how ('prctl',
    'watch') or None when there is none to bind to. Exits at once if that orchestrator is already gone."""
    value = os.environ.pop(ENV, None)
    if not value or not value.isdigit():
        return None
    parent = int(value)
    if sys.platform == "win32":
        join_stage_job(parent)
    sigkill = getattr(signal, "SIGKILL", None)
    if sigkill is not None and _parent_death_signal(sigkill):
        if os.getppid() != parent:  # it died before the binding took effect
            os._exit(EXIT_ORPHANED)
        return "prctl"
    return _watch(parent)


def _parent_death_signal(signum: int) -> bool:
    """prctl(PR_SET_PDEATHSIG): the kernel signals us when the thread that started us exits (the
    orchestrator starts stages from its main thread, so: when it exits)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _alive(process) -> bool:
    """The orchestrator still runs: same pid and start time (psutil checks both), and not a zombie."""
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _watch(parent: int) -> str:
    import psutil

    try:
        process = psutil.Process(parent)
    except psutil.Error:
        os._exit(EXIT_ORPHANED)
    if not _alive(process):
        os._exit(EXIT_ORPHANED)

    def watch() -> None:
        while not _stop.wait(0.2):
            if not _alive(process):
                os._exit(EXIT_ORPHANED)

    threading.Thread(target=watch, name="orchestrator-watch", daemon=True).start()
    return "watch"


_stop = threading.Event()


# ---------------------------------------------------------------------------------------------
# The orchestrator's side


def job_object_name(orchestrator_pid: int) -> str:
    """The name of the orchestrator's Job Object (the session's own namespace)."""
    return f"Local\\pixart-lowmem-stages-{orchestrator_pid}"


def _kernel32():
    """kernel32 with the signatures used here (HANDLE results must not be cut to a C int)."""
    import ctypes
    from ctypes import wintypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    kernel32.CreateJobObjectW.argtypes = [ctypes.c_void_p, wintypes.LPCWSTR]
    kernel32.CreateJobObjectW.restype = wintypes.HANDLE
    kernel32.OpenJobObjectW.argtypes = [wintypes.DWORD, wintypes.BOOL, wintypes.LPCWSTR]
    kernel32.OpenJobObjectW.restype = wintypes.HANDLE
    kernel32.SetInformationJobObject.argtypes = [wintypes.HANDLE, ctypes.c_int, ctypes.c_void_p, wintypes.DWORD]
    kernel32.AssignProcessToJobObject.argtypes = [wintypes.HANDLE, wintypes.HANDLE]
    kernel32.GetCurrentProcess.restype = wintypes.HANDLE
    kernel32.CloseHandle.argtypes = [wintypes.HANDLE]
    return kernel32


def _limit_information():
    """JOBOBJECT_EXTENDED_LIMIT_INFORMATION (winnt.h; 144 bytes on 64-bit Windows). DWORD is spelt
    c_uint32, not wintypes.DWORD, so that the layout is Windows' wherever it is built (and tested)."""
    import ctypes

    dword = ctypes.c_uint32

    class IoCounters(ctypes.Structure):
        _fields_ = [(name, ctypes.c_ulonglong) for name in ("ReadOperationCount", "WriteOperationCount", "OtherOperationCount",
                                                          "ReadTransferCount", "WriteTransferCount", "OtherTransferCount")]

    class BasicLimits(ctypes.Structure):
        _fields_ = [("PerProcessUserTimeLimit", ctypes.c_int64), ("PerJobUserTimeLimit", ctypes.c_int64),
                    ("LimitFlags", dword), ("MinimumWorkingSetSize", ctypes.c_size_t),
                    ("MaximumWorkingSetSize", ctypes.c_size_t), ("ActiveProcessLimit", dword),
                    ("Affinity", ctypes.c_size_t), ("PriorityClass", dword), ("SchedulingClass", dword)]

    class ExtendedLimits(ctypes.Structure):
        _fields_ = [("BasicLimitInformation", BasicLimits), ("IoInfo", IoCounters), ("ProcessMemoryLimit", ctypes.c_size_t),
                    ("JobMemoryLimit", ctypes.c_size_t), ("PeakProcessMemoryUsed", ctypes.c_size_t),
                    ("PeakJobMemoryUsed", ctypes.c_size_t)]

    info = ExtendedLimits()
    info.BasicLimitInformation.LimitFlags = JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE
    return info


# The Job Object's handle must stay open as long as the orchestrator lives (closing it ends the
# stages), so it is kept here, made once per process.
_JOB_HANDLE: list = []


def create_stage_job() -> int | None:
    """Windows: make (once) this orchestrator's kill-on-close Job Object, which its stages join.
    Elsewhere, or when Windows refuses, None: the stages' own watch still ends them."""
    if sys.platform != "win32":
        return None
    if _JOB_HANDLE:
        return _JOB_HANDLE[0]
    import ctypes

    kernel32 = _kernel32()
    handle = kernel32.CreateJobObjectW(None, job_object_name(os.getpid()))
    if not handle:
        return None
    info = _limit_information()
    if not kernel32.SetInformationJobObject(handle, JOB_OBJECT_EXTENDED_LIMIT_INFORMATION, ctypes.byref(info), ctypes.sizeof(info)):
        kernel32.CloseHandle(handle)
        return None
    _JOB_HANDLE.append(handle)
    return handle


def join_stage_job(orchestrator_pid: int) -> bool:
    """Windows, in the stage: put this process into its orchestrator's Job Object, then close our
    handle so that the orchestrator's is the last one (its death closes it, which ends us)."""
    kernel32 = _kernel32()
    job = kernel32.OpenJobObjectW(JOB_OBJECT_ALL_ACCESS, False, job_object_name(orchestrator_pid))
    if not job:
        return False
    try:
        return bool(kernel32.AssignProcessToJobObject(job, kernel32.GetCurrentProcess()))
    finally:
        kernel32.CloseHandle(job)


def popen_options(new_session: bool = False) -> dict:
    """Popen keyword arguments for a stage: on Windows a new process group (so Ctrl-Break can be
    sent to it alone); on POSIX `new_session` keeps a terminal's Ctrl-C from reaching it."""
    if sys.platform == "win32":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": new_session}


def send_interrupt(process: subprocess.Popen) -> None:
    """Ask a stage to stop and clean up: SIGINT on POSIX; on Windows, where send_signal(SIGINT)
    raises, CTRL_BREAK_EVENT to its process group (the stage handles SIGBREAK as Ctrl-C)."""
    if sys.platform == "win32":
        process.send_signal(signal.CTRL_BREAK_EVENT)
    else:
        process.send_signal(signal.SIGINT)


def was_interrupted(code: int, interrupted_code: int) -> bool:
    """A stage's exit code says it was interrupted: its own code, death by SIGINT, or Windows' Ctrl-C exit."""
    sigint = getattr(signal, "SIGINT", 2)
    return code in (interrupted_code, -sigint) or (sys.platform == "win32" and code & 0xFFFFFFFF == STATUS_CONTROL_C_EXIT)
