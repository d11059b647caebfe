"""Bad job files (issue 4, point 3; names from point 8): every bad input ends with exit code 2, one
line on stderr naming the key or value and the fix, no traceback, and nothing written anywhere.
Then property-based tests (hypothesis) of the parser: valid jobs parse to what they say, and no
TOML document, however odd, gets anything but a Job or a one-line JobFileError."""

from __future__ import annotations

import math
import os
from dataclasses import fields
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from orchestrator.jobfile import job as jobfile
from orchestrator.cli import app
from stages.contract import EXIT_USER_ERROR, JobFileError
from stages.resolved import windows_reserved
from tests.conftest import toml_string, tree_state

PROJECT_ROOT = Path(__file__).resolve().parent.parent
GOOD_HEAD = '[job]\nmodel = "{model}"\n'
GOOD_GEN = '[[generation]]\nprompt = "a red apple"\nwidth = 64\nheight = 64\nuse_resolution_binning = false\n'


def gen(**fields) -> str:
    """A [[generation]] entry: the good one with `fields` added or replaced (raw TOML values)."""
    lines = {"prompt": '"a red apple"', "width": "64", "height": "64", "use_resolution_binning": "false"}
    lines.update(fields)
    return "[[generation]]\n" + "".join(f"{k} = {v}\n" for k, v in lines.items())


# (case id, job file text with {model}, extra CLI arguments, substrings the one line must hold:
# the key or value, and the fix)
CASES = [
    ("toml-unterminated-string", '[job]\nmodel = "{model}\n' + GOOD_GEN, [], ["not valid TOML", "line 2", "fix the syntax"]),
    ("toml-duplicate-key", GOOD_HEAD + 'model = "{model}"\n' + GOOD_GEN, [], ["not valid TOML", "fix the syntax"]),
    ("unknown-table", GOOD_HEAD + GOOD_GEN + "[generations]\nx = 1\n", [], ["unknown table '[generations]'", "did you mean 'generation'"]),
    ("unknown-key-job", '[job]\nmodle = "{model}"\n' + GOOD_GEN, [], ["[job]: unknown key 'modle'", "did you mean 'model'"]),
    ("unknown-key-generation", GOOD_HEAD + gen(num_inference_step="20"), [],
     ["#1: unknown key 'num_inference_step'", "did you mean 'num_inference_steps'"]),
    ("unknown-key-defaults", GOOD_HEAD + "[defaults]\nguidance = 3.0\n" + GOOD_GEN, [], ["[defaults]: unknown key 'guidance'", "did you mean 'guidance_scale'"]),
    ("unknown-key-no-close-match", GOOD_HEAD + gen(zzzz="1"), [], ["unknown key 'zzzz'", "valid keys: count, guidance_scale"]),
    ("type-width-string", GOOD_HEAD + gen(width='"512"'), [], ["'width' must be an int, not str '512'", "width = 1024"]),
    ("type-steps-float", GOOD_HEAD + gen(num_inference_steps="2.5"), [], ["'num_inference_steps' must be an int, not float 2.5", "num_inference_steps = 20"]),
    ("type-binning-string", GOOD_HEAD + gen(use_resolution_binning='"yes"'), [], ["'use_resolution_binning' must be a bool", "'yes'", "= true"]),
    ("type-prompt-int", GOOD_HEAD + gen(prompt="42"), [], ["'prompt' must be a str, not int 42", 'prompt = "a red apple"']),
    ("type-seed-bool", GOOD_HEAD + gen(seed="true"), [], ["'seed' must be an int, not bool True", "seed = 42"]),
    ("type-guidance-string", GOOD_HEAD + gen(guidance_scale='"high"'), [], ["'guidance_scale' must be a float", "guidance_scale = 4.5"]),
    ("type-job-not-table", 'job = "{model}"\n' + GOOD_GEN, [], ["[job] must be a table", "[header]"]),
    ("type-generation-entry-not-table", 'generation = ["a red apple"]\n' + GOOD_HEAD, [], ["#1 must be a table", "not str", "[header]"]),
    ("generation-single-table", GOOD_HEAD + '[generation]\nprompt = "x"\n', [], ["write [[generation]] (double brackets)"]),
    ("steps-zero", GOOD_HEAD + gen(num_inference_steps="0"), [], ["'num_inference_steps' = 0 is out of range", "between 1 and 1000"]),
    ("steps-negative", GOOD_HEAD + gen(num_inference_steps="-3"), [], ["'num_inference_steps' = -3", "between 1 and 1000"]),
    ("steps-absurd", GOOD_HEAD + gen(num_inference_steps="100000"), [], ["'num_inference_steps' = 100000", "between 1 and 1000"]),
    ("width-negative", GOOD_HEAD + gen(width="-64"), [], ["'width' = -64 is out of range", "between 16 and 4096 pixels"]),
    ("height-zero", GOOD_HEAD + gen(height="0"), [], ["'height' = 0 is out of range", "between 16 and 4096 pixels"]),
    ("width-huge", GOOD_HEAD + gen(width="100000", use_resolution_binning="true"), [], ["'width' = 100000", "between 16 and 4096"]),
    ("size-not-makeable-unbinned", GOOD_HEAD + gen(width="100"), [],
     ["'width' = 100 cannot be made without resolution binning", "use 96 or 112", "use_resolution_binning = true"]),
    ("height-not-makeable-unbinned", GOOD_HEAD + gen(height="1000"), [], ["'height' = 1000 cannot be made", "use 992 or 1008"]),
    ("count-zero", GOOD_HEAD + gen(count="0"), [], ["'count' = 0 is out of range", "between 1 and 10000"]),
    ("count-absurd", GOOD_HEAD + gen(count="1000000000"), [], ["'count' = 1000000000", "between 1 and 10000"]),
    ("queue-absurd-total", GOOD_HEAD + gen(count="10000") * 10 + gen(count="1"), [], ["#11: the queue would hold 100001 images", "lower 'count' or split"]),
    ("queue-empty", GOOD_HEAD, [], ["the queue is empty", "add at least one [[generation]]"]),
    ("queue-empty-array", "generation = []\n" + GOOD_HEAD, [], ["the queue is empty", "add at least one [[generation]]"]),
    ("prompt-missing", GOOD_HEAD + "[[generation]]\nseed = 1\n", [], ["'prompt' is required", 'prompt = ""']),
    ("guidance-nan", GOOD_HEAD + gen(guidance_scale="nan"), [], ["'guidance_scale' = nan is out of range", "finite number from 0 to 100"]),
    ("guidance-negative", GOOD_HEAD + gen(guidance_scale="-1.0"), [], ["'guidance_scale' = -1.0", "from 0 to 100"]),
    ("seed-negative", GOOD_HEAD + gen(seed="-1"), [], ["'seed' = -1 is out of range", "between 0 and"]),
    ("dtype-unknown", GOOD_HEAD + 'dtype = "fp16"\n' + GOOD_GEN, [], ["'dtype' = 'fp16' is not one of float16, bfloat16, float32"]),
    ("max-sequence-length-zero", GOOD_HEAD + "max_sequence_length = 0\n" + GOOD_GEN, [], ["'max_sequence_length' = 0", "between 1 and 512"]),
    ("job-table-missing", GOOD_GEN, [], ["missing [job] table", "add [job] with model ="]),
    ("model-key-missing", '[job]\nname = "x"\n' + GOOD_GEN, [], ["'model' is required", "hub id or a local diffusers folder"]),
    ("model-empty", '[job]\nmodel = ""\n' + GOOD_GEN, [], ["'model' is required"]),
    ("model-folder-missing", '[job]\nmodel = "./no-such-model"\n' + GOOD_GEN, [], ["model folder", "no-such-model does not exist", "fix 'model' in [job]"]),
    ("model-folder-not-diffusers", '[job]\nmodel = "."\n' + GOOD_GEN, [], ["has no model_index.json", "diffusers folder"]),
    ("hub-id-unknown-offline", '[job]\nmodel = "nobody/does-not-exist"\n' + GOOD_GEN, [],
     ["'nobody/does-not-exist'", "offline mode", "hf download nobody/does-not-exist"]),
    ("name-traversal", GOOD_HEAD + 'name = "../escape"\n' + GOOD_GEN, [], ["name '../escape' is not a safe folder name", "set name ="]),
    ("name-absolute", GOOD_HEAD + 'name = "/tmp/escape"\n' + GOOD_GEN, [], ["name '/tmp/escape' is not a safe folder name"]),
    ("name-dotdot", GOOD_HEAD + 'name = ".."\n' + GOOD_GEN, [], ["name '..' is not a safe folder name"]),
    ("name-subfolder", GOOD_HEAD + 'name = "a/b"\n' + GOOD_GEN, [], ["name 'a/b' is not a safe folder name"]),
    ("name-newline", GOOD_HEAD + 'name = "a\\nb"\n' + GOOD_GEN, [], ["name 'a\\nb' is not a safe folder name"]),
    ("bad-device", GOOD_HEAD + GOOD_GEN, ["--device", "gpu0"], ["--device 'gpu0' is not one of auto, cpu, cuda"]),
    ("bad-force-stage", GOOD_HEAD + GOOD_GEN, ["--force", "paint"], ["--force 'paint' is not a stage", "use one of encode, denoise, decode"]),
    ("bad-max-vram", GOOD_HEAD + GOOD_GEN, ["--max-vram", "lots"], ["memory size 'lots' is not understood", "2GiB"]),
]
# Cases on the job file itself, not its contents.
FILE_CASES = [
    ("file-missing", None, "job.toml", ["job file", "not found", "check the path"]),
    ("file-not-utf8", b"[job]\nmodel = \"\xff\xfe\"\n", "job.toml", ["cannot be read", "save it as UTF-8"]),
    ("file-name-unsafe-as-job-name", GOOD_GEN, "my job!.toml", ["name 'my job!' is not a safe folder name", "set name ="]),
]


def run_cli(tmp_path: Path, job_file: Path, args: list[str]):
    """`orchestrate run` in-process; returns the result after checking that nothing was written."""
    before = tree_state(tmp_path)
    result = CliRunner().invoke(app, ["run", str(job_file), "--workdir", str(tmp_path / "work"), "--device", "cpu", *args])
    assert tree_state(tmp_path) == before, "a failed run wrote files"
    assert not (tmp_path / "work").exists()
    return result


def assert_one_line_error(result, expected: list[str]) -> None:
    assert result.exit_code == EXIT_USER_ERROR, (result.exit_code, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.stdout == "", result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for part in expected:
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"


@pytest.mark.parametrize(("body", "args", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_job_file_exits_2_with_one_line_and_writes_nothing(tiny_model, tmp_path, body, args, expected):
    """Guards point 3 (and 8 for names): one line with the key, value and fix; exit 2; nothing written."""
    job_file = tmp_path / "job.toml"
    job_file.write_text(body.replace("{model}", str(tiny_model)))
    assert_one_line_error(run_cli(tmp_path, job_file, args), expected)


@pytest.mark.parametrize(("content", "name", "expected"), [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])
def test_unusable_job_file_exits_2_with_one_line_and_writes_nothing(tiny_model, tmp_path, content, name, expected):
    """Guards point 3: a missing file, a file that is not UTF-8, a file name that is not a safe job name."""
    job_file = tmp_path / name
    if isinstance(content, bytes):
        job_file.write_bytes(content)
    elif content is not None:
        job_file.write_text(GOOD_HEAD.format(model=tiny_model) + content)
    assert_one_line_error(run_cli(tmp_path, job_file, []), expected)


@pytest.mark.parametrize("case", ["type-width-string", "hub-id-unknown-offline"])
def test_bad_job_file_in_a_real_process_prints_one_line_and_no_traceback(tiny_model, tmp_path, case):
    """Guards point 3 through the console script: the real process, its real stderr and exit code
    (offline mode for the unknown hub id comes from HF_HUB_OFFLINE=1, set in conftest)."""
    body, _, expected = next(c[1:] for c in CASES if c[0] == case)
    job_file = tmp_path / "bad.toml"
    job_file.write_text(body.replace("{model}", str(tiny_model)))
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT), HF_HUB_OFFLINE="1")
    result = subprocess.run([str(Path(sys.executable).with_name("orchestrate")), "run", str(job_file), "--workdir", "work", "--device", "cpu"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == EXIT_USER_ERROR and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: ") and all(part in line for part in expected), line
    assert not (tmp_path / "work").exists()


# ---------------------------------------------------------------------------------------------
# Property-based tests of the parser


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(value)


def toml_dump(doc: dict) -> str:
    """A TOML document for `doc`: scalars first, then [tables], then [[arrays of tables]]."""
    def is_tables(value) -> bool:
        return isinstance(value, list) and bool(value) and all(isinstance(e, dict) for e in value)

    out = [f"{toml_string(k)} = {toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict) and not is_tables(v)]
    for key, value in doc.items():
        if isinstance(value, dict):
            out.append(f"[{toml_string(key)}]")
            out += [f"{toml_string(k)} = {toml_value(v)}" for k, v in value.items()]
    for key, value in doc.items():
        if is_tables(value):
            for entry in value:
                out.append(f"[[{toml_string(key)}]]")
                out += [f"{toml_string(k)} = {toml_value(v)}" for k, v in entry.items()]
    return "\n".join(out) + "\n"


TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)  # any text TOML can hold
INT64 = st.integers(-(2**63), 2**63 - 1)
SCALAR = st.one_of(TEXT, INT64, st.floats(), st.booleans())
GEN_KEYS = [f.name for f in fields(jobfile.GenerationParams)]
JOB_KEYS = [f.name for f in fields(jobfile.JobSettings)]
KEY = st.one_of(st.sampled_from(GEN_KEYS + JOB_KEYS), TEXT)
TABLE = st.dictionaries(KEY, SCALAR, max_size=6)
DOCUMENT = st.dictionaries(
    st.one_of(st.sampled_from(["job", "defaults", "generation"]), TEXT),
    st.one_of(TABLE, st.lists(TABLE, max_size=3), SCALAR),
    max_size=4,
)
# Derandomized: the same 150 examples each run (reproducible in CI), no example database written.
PROPERTY_SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                             suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hypothesis")


def parse(scratch: Path, text: str, name: str = "job.toml"):
    """load_job on `text`: the Job, or the JobFileError (any other exception fails the test)."""
    path = scratch / name
    path.write_text(text, encoding="utf-8")
    try:
        return jobfile.load_job(path)
    except JobFileError as exc:
        message = str(exc)
        assert message and "\n" not in message and "\r" not in message, f"not one line: {message!r}"
        return exc


@PROPERTY_SETTINGS
@given(doc=DOCUMENT)
def test_any_toml_document_gives_a_job_or_a_one_line_error(scratch, doc):
    """Guards point 3: no TOML document, however odd, raises anything but a one-line JobFileError."""
    parse(scratch, toml_dump(doc))


@PROPERTY_SETTINGS
@given(text=st.text(st.characters(blacklist_categories=("Cs",)), max_size=200))
def test_any_text_gives_a_job_or_a_one_line_error(scratch, text):
    """Guards point 3: arbitrary text (mostly not TOML) never crashes the parser."""
    parse(scratch, text)


SIZE = st.integers(1, 256).map(lambda n: n * 16)  # every size is makeable with and without binning
GENERATION = st.fixed_dictionaries({"prompt": TEXT}, optional={
    "negative_prompt": TEXT,
    "width": SIZE,
    "height": SIZE,
    "guidance_scale": st.one_of(st.floats(0, 100), st.integers(0, 100)),
    "num_inference_steps": st.integers(1, 1000),
    "use_resolution_binning": st.booleans(),
    "seed": st.integers(0, jobfile.MAX_SEED),
    "count": st.integers(1, 5),
})
SETTINGS = st.fixed_dictionaries({"model": TEXT.filter(str.strip)}, optional={
    # Valid names only: a trailing dot or a device name Windows reserves is refused on every OS
    # (issue 18; tests/test_platforms.py guards those refusals).
    "name": st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True).filter(
        lambda name: not name.endswith(".") and not windows_reserved(name)),
    "dtype": st.sampled_from(jobfile.DTYPES),
    "clean_caption": st.booleans(),
    "max_sequence_length": st.integers(1, 512),
})


@PROPERTY_SETTINGS
@given(settings_=SETTINGS, defaults=GENERATION.map(lambda g: {k: v for k, v in g.items() if k != "prompt"}),
       generations=st.lists(GENERATION, min_size=1, max_size=4))
def test_valid_jobs_parse_to_exactly_what_they_say(scratch, settings_, defaults, generations):
    """Guards point 3 from the other side: every valid job parses, with defaults applied under each
    entry's own values, ints accepted for floats, and the name from the file when not given."""
    job = parse(scratch, toml_dump({"job": settings_, "defaults": defaults, "generation": generations}))
    assert isinstance(job, jobfile.Job), job
    assert job.settings.name == settings_.get("name", "job")
    assert job.settings.model == settings_["model"]
    assert len(job.generations) == len(generations)
    for parsed, given_ in zip(job.generations, generations):
        expected = {**defaults, **given_}
        for field in fields(jobfile.GenerationParams):
            value = getattr(parsed, field.name)
            if field.name in expected:
                assert value == expected[field.name], field.name
            else:
                assert value == field.default, field.name
        assert isinstance(parsed.guidance_scale, float)


RANGES = {  # key -> values out of range
    "num_inference_steps": st.one_of(st.integers(max_value=0), st.integers(min_value=1001)),
    "count": st.one_of(st.integers(max_value=0), st.integers(min_value=jobfile.MAX_ITEMS + 1)),
    "width": st.one_of(st.integers(max_value=15), st.integers(min_value=jobfile.MAX_SIDE + 1)),
    "height": st.one_of(st.integers(max_value=15), st.integers(min_value=jobfile.MAX_SIDE + 1)),
    "seed": st.integers(max_value=-1),
    "guidance_scale": st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=100.0001), st.just(math.inf), st.just(math.nan)),
}


@PROPERTY_SETTINGS
@given(data=st.data(), key=st.sampled_from(sorted(RANGES)), in_defaults=st.booleans())
def test_out_of_range_values_are_refused_naming_key_and_value(scratch, data, key, in_defaults):
    """Guards point 3: any out-of-range number, in [defaults] or in an entry, is refused by name."""
    value = data.draw(RANGES[key].filter(lambda v: -(2**63) <= v < 2**63 if isinstance(v, int) else True))
    table = {key: value}
    doc = {"job": {"model": "m"}, "defaults": table if in_defaults else {},
           "generation": [{"prompt": "x", "use_resolution_binning": True, **({} if in_defaults else table)}]}
    error = parse(scratch, toml_dump(doc))
    assert isinstance(error, JobFileError)
    assert f"'{key}' = {value!r} is out of range" in str(error), str(error)


@PROPERTY_SETTINGS
@given(key=TEXT.filter(lambda k: k not in GEN_KEYS), table=st.sampled_from(["job", "defaults", "generation"]))
def test_unknown_keys_are_refused_naming_the_key(scratch, key, table):
    """Guards point 3: any key the tables do not have is refused, shown on one line."""
    doc = {"job": {"model": "m"}, "generation": [{"prompt": "x"}]}
    if table == "generation":
        doc["generation"][0][key] = 1
    else:
        doc.setdefault(table, {})[key] = 1
    if table == "job" and key in JOB_KEYS:
        return
    error = parse(scratch, toml_dump(doc))
    assert isinstance(error, JobFileError) and f"unknown key '{repr(key)[1:-1]}'" in str(error), error


@PROPERTY_SETTINGS
@given(name=TEXT)
def test_no_job_name_leads_outside_the_workdir(scratch, name):
    """Guards point 8: whatever `name` says, the job folder is a direct child of the workdir."""
    job = parse(scratch, toml_dump({"job": {"model": "m", "name": name}, "generation": [{"prompt": "x"}]}))
    if isinstance(job, JobFileError):
        assert "is not a safe folder name" in str(job)
        return
    workdir = (scratch / "work").resolve()
    job_dir = jobfile.job_dir_for(job, workdir)
    assert job_dir.parent == workdir and job_dir.name == name and name not in (".", "..")
