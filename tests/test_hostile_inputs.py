"""Hostile inputs the orchestrator reads (issue 17, points 6-10 and its fault-injection pass): the
job file, prompt lists, model folders, configs, weights and `convert`'s pickles, each replaced by a
FIFO, a folder, a link to /dev/zero, an empty, truncated, wrong or huge sparse file. Each must end
in one line and exit 2 before any stage starts, never hang (a SIGALRM deadline guards the in-process
runs), never touch a file outside, and never lose what a finished run made."""

from __future__ import annotations

import os
import pickle
import shutil
import signal

import pytest
import torch
from typer.testing import CliRunner

from orchestrator.executors import session
from orchestrator.cli import app
from orchestrator.executors.runner import StageFailedError, run_stage
from tests.conftest import artifact_bytes, tree_state, write_job

JOB = """
[job]
name = "hostile"
model = "{model}"
{extra}
[defaults]
width = 64
height = 64
use_resolution_binning = false
num_inference_steps = 2
[[generation]]
{generation}
seed = 1
"""


@pytest.fixture(autouse=True)
def deadline():
    """A hang (a FIFO opened for reading) fails the test after 60 s instead of blocking the suite."""
    def expired(signum, frame):
        raise TimeoutError("hung: a hostile input was opened or read without limit")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def model(tiny_model, tmp_path):
    """A copy of the tiny model, ours to damage."""
    return shutil.copytree(tiny_model, tmp_path / "model")


def _job(tmp_path, model, generation='prompt = "an owl reading a book"', extra=""):
    return write_job(tmp_path, JOB.format(model=model, generation=generation, extra=extra))


def _run(job_file, workdir, *extra):
    return CliRunner().invoke(app, ["run", str(job_file), "--workdir", str(workdir), "--device", "cpu", *extra])


def _one_line(result, *parts, code=2):
    """Exit `code`, one line on stderr naming each of `parts`, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for part in parts:
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"
    return lines[0]


def _plant(path, kind: str):
    """Replace `path` by a hostile entry of `kind`."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind.startswith("sparse-"):  # a huge file that takes no disk: os.truncate extends with a hole
        path.write_bytes(b"")
        os.truncate(path, int(kind.split("-")[1]) << 20)
    elif kind == "garbage":
        path.write_bytes(b"\x00\xffnot what it should be" * 3)
    else:
        raise ValueError(kind)


# ---------------------------------------------------------------------------------------------
# The job file and prompt lists


@pytest.mark.parametrize(("kind", "says"), [
    ("fifo", "is a FIFO (named pipe), not a regular file"),
    ("folder", "is a folder, not a regular file"),
    ("dev-zero", "is a character device, not a regular file"),
    ("sparse-100", "is over 64 MiB (104,857,600 bytes)"),
    ("empty", "missing [job] table"),
    ("garbage", "cannot be read"),
])
def test_hostile_job_file(tmp_path, kind, says):
    job_file = tmp_path / "job.toml"
    _plant(job_file, kind)
    before = tree_state(tmp_path)
    _one_line(_run(job_file, tmp_path / "work"), says)
    assert tree_state(tmp_path) == before and not (tmp_path / "work").exists()


@pytest.mark.parametrize(("kind", "says"), [
    ("fifo", "is a FIFO (named pipe), not a regular file"),
    ("folder", "is a folder, not a file"),
    ("dev-zero", "is a character device, not a regular file"),
    ("sparse-2048", "is over 64 MiB (2,147,483,648 bytes)"),  # issue 17: read whole, MemoryError at 4 GB RSS
    ("empty", "has no prompts"),
    ("garbage", "not UTF-8 text"),
])
def test_hostile_prompts_file(model, tmp_path, kind, says):
    _plant(tmp_path / "prompts.txt", kind)
    job_file = _job(tmp_path, model, generation='prompts_file = "prompts.txt"')
    _one_line(_run(job_file, tmp_path / "work"), "prompt list", says)
    assert not (tmp_path / "work").exists()


def test_bare_prompt_list_hostile_and_model_relative_to_the_current_folder(model, tmp_path, monkeypatch):
    """Issue 17, point 10: `run lists/list.txt --model org/name` never means lists/org/name."""
    lists = tmp_path / "lists"
    lists.mkdir()
    shutil.copytree(model, lists / "org" / "name")  # the trap: a model folder beside the list
    (lists / "list.txt").write_text("an owl reading a book\n")
    monkeypatch.chdir(tmp_path)  # the user is in tmp_path: org/name is a hub id (not in the offline cache)
    line = _one_line(_run("lists/list.txt", tmp_path / "work", "--model", "org/name"), "'org/name'", "Hugging Face cache")
    assert str(lists / "org") not in line
    _plant(lists / "fifo.txt", "fifo")
    _one_line(_run("lists/fifo.txt", tmp_path / "work", "--model", str(model)), "is a FIFO (named pipe), not a regular file")
    assert not (tmp_path / "work").exists()


# ---------------------------------------------------------------------------------------------
# Model folders: configs and weights


@pytest.mark.parametrize(("where", "kind", "says"), [
    ("vae/config.json", "dev-zero", "is not a regular file"),  # issue 17: MemoryError traceback
    ("transformer/config.json", "fifo", "is not a regular file"),
    ("tokenizer/tokenizer.json", "fifo", "is not a regular file"),  # read by transformers in encode: would hang there
    ("model_index.json", "sparse-2", "is over 1 MiB (2,097,152 bytes)"),
    ("model_index.json", "fifo", "is a FIFO (named pipe), not a regular file"),
    ("scheduler/scheduler_config.json", "folder", "is a folder, not a regular file"),
    ("vae/config.json", "empty", "is not valid JSON"),
    ("transformer/config.json", "garbage", "not UTF-8 text"),
    ("text_encoder/model.safetensors", "empty", "is damaged (only 0 bytes, shorter than a header); download it again"),
    ("vae/diffusion_pytorch_model.safetensors", "garbage", "is damaged (cut short or not safetensors"),
    ("transformer/diffusion_pytorch_model.safetensors", "sparse-2", "is damaged (its header is not valid JSON)"),  # zeros: an empty header
])
def test_hostile_model_file(model, tmp_path, where, kind, says):
    _plant(model / where, kind)
    job_file = _job(tmp_path, model)
    before = tree_state(tmp_path)
    _one_line(_run(job_file, tmp_path / "work"), where.split("/")[-1], says)
    assert tree_state(tmp_path) == before and not (tmp_path / "work").exists()


@pytest.mark.parametrize("cut", [100, -1])  # issue 17, point 6: "truncated to 100 bytes"; one byte short of the data
def test_truncated_weights_refused_before_any_stage(model, tmp_path, cut):
    weights = model / "text_encoder" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:cut])
    line = _one_line(_run(_job(tmp_path, model), tmp_path / "work"), f"weight file {weights} is damaged", "download it again")
    assert "cut short" in line and not (tmp_path / "work").exists()


def test_damaged_weights_after_a_finished_run(model, tmp_path, cli_in_process):
    """Weights damaged after a run: `run` refuses up front and the stage itself names the file
    (the runner's message carries its reason); the finished images and records stay byte-identical."""
    workdir = tmp_path / "work"
    job_file = _job(tmp_path, model)
    session.run_job_file(job_file, workdir, "cpu", (), echo=print)
    job_dir = workdir / "hostile"
    made = artifact_bytes(job_dir)
    records = {p: p.read_bytes() for p in job_dir.glob("*/*.json")}
    weights = model / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    _one_line(_run(job_file, workdir, "--force", "decode"), f"weight file {weights} is damaged")
    with pytest.raises(StageFailedError) as failed:  # the real stage process, as `orchestrate stage decode` starts it
        run_stage("decode", job_dir, True, lambda line: None)
    assert failed.value.exit_code == 2 and "stage decode failed (exit 2)" in str(failed.value)
    assert f"weight file {weights} is damaged" in str(failed.value) and "\n" not in str(failed.value)
    assert artifact_bytes(job_dir) == made and all(p.read_bytes() == b for p, b in records.items() if p.name != "summary.json")


# ---------------------------------------------------------------------------------------------
# Schedulers (issue 17, point 7)


def _drop_tensor(folder: Path, part: str) -> str:
    """Rewrite `part`'s weights without one tensor of its first block (the header stays valid)."""
    from safetensors.torch import load_file, save_file

    weights = next((folder / part).glob("*.safetensors"))
    tensors = load_file(weights)
    dropped = next(k for k in sorted(tensors) if ".1." in k and k.endswith(".weight"))
    del tensors[dropped]
    save_file(tensors, weights)
    return dropped


@pytest.mark.parametrize(("part", "stage"), [("text_encoder", "encode"), ("transformer", "denoise"), ("vae", "decode")])
def test_weights_lacking_a_tensor_refused_by_the_stage(model, tmp_path, part, stage):
    """A weights file whose header is valid but lacks a tensor: transformers would fill it with
    random numbers and run (images from random weights, no error), diffusers would leave it on
    `meta` and fail with a traceback. The stage names the file and the first missing tensor, exit 2."""
    dropped = _drop_tensor(model, part)
    line = _one_line(_run(_job(tmp_path, model), tmp_path / "work"), f"stage {stage} failed (exit 2)", f"{model / part}",
                     f"lack 1 tensor(s) the model needs, first {dropped}")
    assert "check that the model folder is complete" in line
    assert not list((tmp_path / "work" / "hostile" / stage).glob("*.safetensors")) + list((tmp_path / "work" / "hostile" / stage).glob("*.png"))


@pytest.mark.parametrize(("part", "runtime"), [("text_encoder", {"encode": {"strategy": "stream", "batch_size": 1}}),
                                                ("transformer", {"denoise": {"strategy": "offload"}})])
def test_streamed_weights_lacking_a_tensor_refused_before_the_first_block(model, tmp_path, part, runtime):
    """The same under the streaming strategies, which read each block's tensors only when it runs:
    the stage refuses before the first block instead of failing in the middle of the queue."""
    from tests.conftest import run_inprocess

    dropped = _drop_tensor(model, part)
    stage = next(iter(runtime))
    with pytest.raises(RuntimeError, match=f"stage {stage} exited 2"):
        run_inprocess(_job(tmp_path, model), tmp_path / "work", runtime={"stages": runtime})
    log = (tmp_path / "work" / "hostile" / stage / "stage.log").read_text()
    assert f"lack 1 tensor(s) the model needs, first {dropped}" in log and "Traceback" not in log, log[-2000:]


@pytest.mark.parametrize(("extra", "component", "says"), [
    ('scheduler = "FlowMatchEulerDiscreteScheduler"', None, "a diffusers scheduler of another family"),
    ('scheduler = "VQDiffusionScheduler"', None, "a diffusers scheduler of another family"),
    ('scheduler = "ScoreSdeVeScheduler"', None, "a diffusers scheduler of another family"),
    ('scheduler = "DDIMInverseScheduler"', None, "a diffusers scheduler of another family"),
    ("", "AutoencoderKL", "a diffusers model or pipeline class"),
    ("", "PixArtAlphaPipeline", "a diffusers model or pipeline class"),
    ("", "os", "not a diffusers scheduler class"),
])
def test_unusable_scheduler_refused_before_any_stage(model, tmp_path, extra, component, says):
    if component is not None:
        config = model / "scheduler" / "scheduler_config.json"
        config.write_text(config.read_text().replace('"DPMSolverMultistepScheduler"', f'"{component}"'))
    line = _one_line(_run(_job(tmp_path, model, extra=extra), tmp_path / "work"), says, "DPMSolverMultistepScheduler", "LCMScheduler", "DDIMScheduler")
    assert ("[job] 'scheduler'" in line) if extra else ("scheduler_config.json '_class_name'" in line)
    assert "FlowMatch" not in line.split("use a discrete-time")[1]
    assert not (tmp_path / "work").exists()


def test_every_accepted_scheduler_drives_a_denoising_loop(model, tmp_path):
    """The names accepted without importing diffusers pass the rule; every class the rule accepts
    either runs 10 steps of set_timesteps / scale_model_input / step from the model's scheduler
    config to finite latents, or cannot be built from that config and is then refused up front."""
    import diffusers

    from orchestrator.jobfile.job import COMMON_SCHEDULERS, scheduler_choices
    from stages.resolved import read_model_config

    choices = scheduler_choices()
    assert COMMON_SCHEDULERS <= set(choices)
    assert not [n for n in choices if n.startswith(("FlowMatch", "VQ", "ScoreSde")) or "Inverse" in n]
    config = read_model_config(model / "scheduler" / "scheduler_config.json")
    generator = torch.Generator().manual_seed(0)
    refused = []
    for name in choices:
        try:
            scheduler = getattr(diffusers, name).from_config(config)
        except Exception:
            refused.append(name)
            _one_line(_run(_job(tmp_path, model, extra=f'scheduler = "{name}"'), tmp_path / "work"), f"{name} cannot be built from the model's scheduler config")
            continue
        scheduler.set_timesteps(10)
        latents = torch.randn(1, 4, 8, 8, generator=generator) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            noise_pred = torch.randn(1, 4, 8, 8, generator=generator) * 0.1
            latents = scheduler.step(noise_pred, t, scheduler.scale_model_input(latents, t), return_dict=False)[0]
        assert torch.isfinite(latents).all(), name
    assert len(refused) <= 3, refused  # today SASolver and UnCLIP, from a DPM-Solver config


# ---------------------------------------------------------------------------------------------
# convert (issue 17, point 9)


class _Evil:
    def __reduce__(self):
        return (os.system, ("true",))


def _convert(folder):
    return CliRunner().invoke(app, ["convert", str(folder)])


def test_convert_refuses_a_malicious_pickle_with_torchs_reason(tmp_path):
    folder = tmp_path / "transformer"
    folder.mkdir()
    torch.save({"weight": torch.zeros(2), "payload": _Evil()}, folder / "diffusion_pytorch_model.bin")
    line = _one_line(_convert(folder), "diffusion_pytorch_model.bin", "refused it (UnpicklingError: ",
                     "GLOBAL posix.system", "not converted")
    assert line.endswith("not converted") and "Check the documentation" not in line
    (folder / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(_Evil()))  # a bare pickle, not torch's zip format
    _one_line(_convert(folder), "refused it (UnpicklingError: ", "not converted")
    assert sorted(p.name for p in folder.iterdir()) == ["diffusion_pytorch_model.bin"]


@pytest.mark.parametrize(("index", "says"), [
    (b"{not json", "is not valid JSON"),
    (b'{"metadata": {}}', "has no weight_map"),
    (b'{"weight_map": {"a": "diffusion_pytorch_model-00001-of-00002.bin", "b": "diffusion_pytorch_model-00002-of-00002.bin"}}',
     "names shards that are not in"),
])
def test_convert_validates_the_shard_index_before_writing(tmp_path, index, says):
    folder = tmp_path / "transformer"
    folder.mkdir()
    torch.save({"a": torch.ones(3)}, folder / "diffusion_pytorch_model-00001-of-00002.bin")
    (folder / "diffusion_pytorch_model.bin.index.json").write_bytes(index)
    _one_line(_convert(folder), "diffusion_pytorch_model.bin.index.json", says, "nothing was converted")
    assert not list(folder.glob("*.safetensors*"))  # issue 17: a .safetensors was written before the traceback
