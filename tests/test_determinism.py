"""Guards determinism across processes: every fresh stage process computes the same bits from the
same inputs, equal to what the one-process diffusers pipeline computes (CPU, float32).

The defect this guards (issue 12): about one fresh denoise process in ten computed other latents,
because oneMKL resolves each vector-math (VML) kernel lazily on its first call, and a first call
made by several threads at once can run one thread's chunk with the low-accuracy kernel
(pytorch/pytorch#188792). The first such call in a stage built the transformer's sin-cos position
table, which every item then used. `stages.entry.warm_up_math_kernels` resolves every VML
kernel single-threaded before any model work; these tests check that it runs first, that it
covers every VML op the three models use, and (marked `stress`, run by .ci/run) that 20 fresh
processes per stage give one result.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from stages import contract, entry
from tests.conftest import load_png, resolved_items, run_inprocess, write_job

ROOT = Path(__file__).resolve().parent.parent

# The unary float ops aten/src/ATen/cpu/vml.h routes to oneMKL VML (IMPLEMENT_VML_MKL, across the
# torch 2.x versions): written out here from upstream, not from stages/entry.py, so that
# dropping one from VML_OPS that a model uses makes the coverage test fail.
UPSTREAM_VML_OPS = {"abs", "acos", "asin", "atan", "cos", "erf", "erfc", "erfinv", "exp", "expm1", "log",
                    "log10", "log1p", "log2", "sin", "sqrt", "tan", "tanh", "trunc"}

JOB = """
[job]
name = "det"
model = "{model}"

[defaults]
num_inference_steps = 6
width = 256
height = 192
use_resolution_binning = false

[[generation]]
prompt = "pirate ship trapped in a cosmic maelstrom nebula"
seed = 11

[[generation]]
prompt = "an owl reading a book in a cozy library"
negative_prompt = "blurry"
guidance_scale = 1.0
seed = 12
"""


def test_every_stage_warms_up_the_math_kernels_before_loading_its_model(tiny_model, tmp_path, monkeypatch):
    """The warm-up must come before the model is built (the position table is made in __init__)."""
    job_dir, _, _ = run_inprocess(write_job(tmp_path, JOB.format(model=tiny_model)), tmp_path / "work")
    events: list[str] = []
    monkeypatch.setattr(entry, "warm_up_math_kernels", lambda: events.append("warm-up"))
    import stages.decode
    import stages.denoise
    import stages.encode

    for module, loader in ((stages.encode, "load_text_encoder"), (stages.denoise, "load_transformer"), (stages.decode, "load_vae")):
        original = getattr(module, loader)

        def recording(*args, _original=original, _name=loader, **kwargs):
            events.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, loader, recording)
        assert module.main([str(job_dir), "--force"]) == 0
    assert events == ["warm-up", "load_text_encoder", "warm-up", "load_transformer", "warm-up", "load_vae"]


class _OpRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Names of the aten ops run on float32/float64 tensors (the dtypes VML serves)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if tensors and tensors[0].dtype in (torch.float32, torch.float64):
            self.names.add(func.overloadpacket.__name__.rstrip("_"))
        return func(*args, **(kwargs or {}))


def test_the_warm_up_covers_every_vml_op_the_three_models_use(tiny_model):
    """Build each model and run it (under a recorder); every VML op seen must be warmed up."""
    from diffusers import PixArtAlphaPipeline

    recorder = _OpRecorder()
    with recorder, torch.no_grad():
        pipe = PixArtAlphaPipeline.from_pretrained(tiny_model)
        pipe.set_progress_bar_config(disable=True)
        pipe("a red apple", width=256, height=192, num_inference_steps=2, use_resolution_binning=False,
             generator=torch.Generator("cpu").manual_seed(0))
    used = recorder.names & UPSTREAM_VML_OPS
    assert {"sin", "cos"} <= used, used  # the position table: if this fails, the recorder is broken
    assert used <= set(entry.VML_OPS), f"not warmed up: {sorted(used - set(entry.VML_OPS))}"


def _digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def _outputs(job_dir: Path, stage: str) -> list[Path]:
    suffix = ".png" if stage == "decode" else ".safetensors"
    return sorted(p for p in (job_dir / stage).glob(f"*{suffix}") if not p.name.startswith(contract.TMP_PREFIX))


def _fresh_runs(job_dir: Path, stage: str, runs: int) -> list[str]:
    """`python -m stages.<stage> <job_dir> --force` in `runs` fresh processes, one after another;
    the digest of the stage's outputs after each."""
    import os

    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    digests = []
    for _ in range(runs):
        done = subprocess.run([sys.executable, "-m", f"stages.{stage}", str(job_dir), "--force"], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        digests.append(_digest(_outputs(job_dir, stage)))
    return digests


@pytest.mark.stress
def test_twenty_fresh_processes_per_stage_compute_one_result_equal_to_the_pipeline(tiny_model, tmp_path):
    """Two replicas of a job folder, 10 fresh processes each, run side by side (so the processes
    start under CPU contention, as the defect needed): one digest per stage, the in-process one."""
    from diffusers import PixArtAlphaPipeline
    from safetensors.torch import load_file

    job_dir, _, _ = run_inprocess(write_job(tmp_path, JOB.format(model=tiny_model)), tmp_path / "work")
    items = resolved_items(job_dir)

    # The in-process artifacts equal the pipeline's own embeddings, latents and pixels, bit for bit.
    pipe = PixArtAlphaPipeline.from_pretrained(tiny_model)
    pipe.set_progress_bar_config(disable=True)
    embeds = [load_file(str(path))["prompt_embeds"] for path in _outputs(job_dir, "encode")]
    with torch.no_grad():
        for item in items:
            ours, _, _, _ = pipe.encode_prompt(item["prompt"], do_classifier_free_guidance=False, clean_caption=True,
                                               max_sequence_length=120)
            assert any(torch.equal(ours, e) for e in embeds), f"{item['id']}: embeddings differ from encode_prompt"
            kwargs = dict(negative_prompt=item["negative_prompt"], width=item["width"], height=item["height"],
                          guidance_scale=item["guidance_scale"], num_inference_steps=item["num_inference_steps"],
                          use_resolution_binning=False)
            latents = pipe(item["prompt"], output_type="latent", generator=torch.Generator("cpu").manual_seed(item["seed"]), **kwargs).images
            assert torch.equal(load_file(str(job_dir / "denoise" / f"{item['id']}.safetensors"))["latents"], latents), item["id"]
            image = pipe(item["prompt"], generator=torch.Generator("cpu").manual_seed(item["seed"]), **kwargs).images[0]
            assert np.array_equal(load_png(job_dir / item["image"]), np.asarray(image.convert("RGB"))), item["id"]

    replica = tmp_path / "replica" / job_dir.name  # stage locks are per job folder: a copy runs alongside
    shutil.copytree(job_dir, replica)
    replicas = [job_dir, replica]
    expected = {stage: _digest(_outputs(job_dir, stage)) for stage in contract.STAGES}
    seen = {}
    for stage in contract.STAGES:
        with ThreadPoolExecutor(len(replicas)) as pool:
            results = list(pool.map(lambda folder: _fresh_runs(folder, stage, 10), replicas))
        seen[stage] = [d for r in results for d in r]
    print({stage: {d: digests.count(d) for d in set(digests)} for stage, digests in seen.items()})
    for stage, digests in seen.items():
        assert len(digests) == 20
        assert set(digests) == {expected[stage]}, f"{stage}: {len(set(digests))} distinct results in 20 fresh processes"
