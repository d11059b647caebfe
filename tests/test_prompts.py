"""Prompt lists (issue 10, part 3; orchestrator/jobfile/prompts.py and the `prompts_file` key in job.py):
each prompt line becomes a generation with its entry's other keys and its own recorded seed; a bad
list is one line naming the file (and line), exit 2, nothing written; `orchestrate run list.txt
--model M` runs a list with the defaults in <workdir>/<list name>/."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from orchestrator.jobfile import job as jobfile
from orchestrator.cli import app
from stages.contract import EXIT_USER_ERROR, JobFileError
from stages.files import publish_json
from tests.conftest import resolved_items, toml_string, tree_state, write_job
from tests.test_jobfile import PROPERTY_SETTINGS, TEXT, parse, scratch  # noqa: F401 (scratch: a fixture)

LIST = "# holiday shots\n\na red apple on a table\n   a blue owl at night  \r\n  # not this one\na red apple on a table\n"


def _entry(extra: str = "", prompts_file: str = "prompts.txt") -> str:
    return f"""
        [job]
        model = "m"
        [defaults]
        guidance_scale = 3.0
        [[generation]]
        prompt = "first, from the job file"
        [[generation]]
        prompts_file = {toml_string(prompts_file)}
        width = 320
        {extra}
    """


def test_each_prompt_line_is_a_generation_with_the_entry_keys_and_spaced_seeds(tmp_path):
    """Guards the expansion: blank and # lines skipped, blanks around a prompt dropped, the entry's
    keys and [defaults] on every line, line k seeded seed + k * count, and the list read relative
    to the job file (not the current folder)."""
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "prompts.txt").write_text(LIST, encoding="utf-8")
    job = jobfile.load_job(write_job(tmp_path, _entry("seed = 100\ncount = 3", "lists/prompts.txt")))
    lists = job.generations[1:]
    assert [g.prompt for g in lists] == ["a red apple on a table", "a blue owl at night", "a red apple on a table"]
    assert [g.seed for g in lists] == [100, 103, 106]
    assert all(g.count == 3 and g.width == 320 and g.guidance_scale == 3.0 for g in lists)
    assert job.generations[0].prompt == "first, from the job file"


def test_every_image_of_a_list_gets_a_distinct_recorded_seed(tiny_model, tmp_path):
    """Guards seeds: with a seed, every image of every line has its own; without one, each line
    (a repeated prompt too) draws its own, and a second resolve reuses them all (no reruns)."""
    (tmp_path / "prompts.txt").write_text(LIST, encoding="utf-8")
    body = f'[job]\nmodel = "{tiny_model}"\n[[generation]]\nprompts_file = "prompts.txt"\ncount = 2\nwidth = 64\nheight = 64\n'
    pinned = jobfile.resolve_job(jobfile.load_job(write_job(tmp_path, body + "seed = 5\n")), tmp_path / "a", "cpu")
    assert [i["seed"] for i in pinned["items"]] == [5, 6, 7, 8, 9, 10]

    job = jobfile.load_job(write_job(tmp_path, body))
    job_dir = tmp_path / "b"
    first = jobfile.resolve_job(job, job_dir, "cpu")
    seeds = [i["seed"] for i in first["items"]]
    assert len(set(seeds)) == 6, seeds  # the repeated line draws its own seed
    job_dir.mkdir()
    publish_json(job_dir / "job.resolved.json", first)  # as `orchestrate run` does
    again = jobfile.resolve_job(job, job_dir, "cpu")
    assert [i["seed"] for i in again["items"]] == seeds


BAD_LISTS = [
    # (case, list file bytes or None for no file, the entry's extra keys, what the one line names)
    ("missing", None, "", ["prompts.txt", "not found", "relative to the job file"]),
    ("empty", b"", "", ["prompts.txt", "has no prompts", "one prompt per line"]),
    ("only-comments", b"# a\n\n   \n#b\n", "", ["prompts.txt", "has no prompts"]),
    ("not-utf8", b"a cat\n# fine\nan \xe9t\xe9 scene\n", "", ["prompts.txt line 3", "not UTF-8", "byte 0xe9", "save the prompt list as UTF-8"]),
    ("with-prompt", b"a cat\n", 'prompt = "a dog"', ["#2", "'prompt' and 'prompts_file' are both set", "keep one"]),
    ("not-a-string", b"a cat\n", None, ["#2", "'prompts_file' must be a file name", 'prompts_file = "prompts.txt"']),
    ("seed-out-of-range", b"a\nb\n", f"seed = {jobfile.MAX_SEED}", ["prompts.txt line 2", "'seed'", "out of range"]),
]


@pytest.mark.parametrize(("content", "extra", "expected"), [c[1:] for c in BAD_LISTS], ids=[c[0] for c in BAD_LISTS])
def test_a_bad_prompt_list_is_one_line_exit_2_and_writes_nothing(tiny_model, tmp_path, content, extra, expected):
    """Guards the errors: the file (and line) named, the fix given, exit 2, no traceback, no file written."""
    if content is not None:
        (tmp_path / "prompts.txt").write_bytes(content)
    body = _entry(extra or "").replace('model = "m"', f'model = "{tiny_model}"')
    if extra is None:
        body = body.replace('prompts_file = "prompts.txt"', "prompts_file = 3")
    job_file = write_job(tmp_path, body)
    before = tree_state(tmp_path)
    result = CliRunner().invoke(app, ["run", str(job_file), "--workdir", str(tmp_path / "work"), "--device", "cpu"])
    assert result.exit_code == EXIT_USER_ERROR, result.output
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: ") and all(part in line for part in expected), line
    assert tree_state(tmp_path) == before and not (tmp_path / "work").exists()


@PROPERTY_SETTINGS
@given(name=TEXT, content=st.binary(max_size=60))
def test_any_prompts_file_value_gives_a_job_or_a_one_line_error(scratch, name, content):
    """Guards robustness: whatever file name and bytes, the parser returns a Job or one line (a
    NUL in the name, a folder, '', '/', odd bytes...)."""
    (scratch / "list.txt").write_bytes(content)
    for given_name in (name, "list.txt"):
        result = parse(scratch, f'[job]\nmodel = "m"\n[[generation]]\nprompts_file = {toml_string(given_name)}\n')
        assert isinstance(result, (jobfile.Job, JobFileError)), result


def test_run_a_txt_prompt_list_with_model_in_one_command(tiny_model_256, tmp_path, monkeypatch, cli_in_process):
    """Guards `orchestrate run list.txt --model M`: the folder is <workdir>/<list name>, one image
    per prompt line at the defaults with its seed recorded, the model relative to the current
    folder; a second run does nothing."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "holiday.txt").write_text("a red apple\n# skipped\na blue owl\n", encoding="utf-8")
    (tmp_path / "models").symlink_to(tiny_model_256.parent)
    args = ["run", "lists/holiday.txt", "--model", f"models/{tiny_model_256.name}", "--workdir", "work", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    job_dir = tmp_path / "work" / "holiday"
    items = resolved_items(job_dir)
    assert [i["prompt"] for i in items] == ["a red apple", "a blue owl"]
    defaults = jobfile.GenerationParams(prompt="")
    assert all((i["width"], i["height"], i["num_inference_steps"], i["guidance_scale"]) ==
               (256, 256, defaults.num_inference_steps, defaults.guidance_scale) for i in items)
    assert all((job_dir / i["image"]).is_file() for i in items)
    resolved = json.loads((job_dir / "job.resolved.json").read_text())
    assert resolved["model"]["path"] == str(tiny_model_256.resolve())
    assert len(resolved["drawn_seeds"]) == 2 and sorted(resolved["drawn_seeds"].values()) == sorted(i["seed"] for i in items)
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "nothing to do" in again.stdout, again.output


@pytest.mark.parametrize(("args", "expected"), [
    (["run", "holiday.txt"], ["holiday.txt is a prompt list", "--model"]),
    (["run", "holiday.txt", "--model", "./nowhere"], ["--model ./nowhere", "does not exist"]),
    (["run", "missing.txt", "--model", "m"], ["prompt list missing.txt not found"]),
    (["run", "my list.txt", "--model", "m"], ["'my list'", "not a safe folder name", "rename the file"]),
    (["run", "job.toml", "--model", "m"], ["--model is only for a prompt list", "job.toml", "[job]"]),
])
def test_prompt_list_command_line_mistakes_are_one_line(tmp_path, monkeypatch, args, expected):
    """Guards the .txt path's errors: no model, a model folder that is not there, a missing list,
    a list name that cannot name a folder, --model with a job file; exit 2, nothing written."""
    monkeypatch.chdir(tmp_path)
    for name in ("holiday.txt", "my list.txt"):
        (tmp_path / name).write_text("a red apple\n")
    write_job(tmp_path, '[job]\nmodel = "m"\n[[generation]]\nprompt = "x"\n')
    before = tree_state(tmp_path)
    result = CliRunner().invoke(app, [*args, "--workdir", "work", "--device", "cpu"])
    assert result.exit_code == EXIT_USER_ERROR, result.output
    (line,) = result.stderr.splitlines()
    assert all(part in line for part in expected), line
    assert tree_state(tmp_path) == before
