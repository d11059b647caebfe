"""Guards the devices besides CUDA (issue 18, point 3), simulated on the CPU with torch.mps,
torch.xpu and torch.accelerator faked as tests/test_cuda_paths.py fakes CUDA: which device `auto`
and --device choose, ROCm named as such, each stage's cap and peak on MPS and XPU, MPS's unified
memory planned as one pool, and the plain attention path counted and chunked, with chunked
attention giving the same pixels bit for bit on the CPU."""

from __future__ import annotations

import types

import pytest
import torch
from typer.testing import CliRunner

from orchestrator.planning import memory
from orchestrator.planning import prepare
from stages import contract, entry, measure

from tests.conftest import run_inprocess, write_job

GIB = 1024**3


def job_toml(tmp_path, model, name="dev", side=64):
    return write_job(tmp_path, f"""
        [job]
        name = "{name}"
        model = "{model}"
        [defaults]
        width = {side}
        height = {side}
        use_resolution_binning = false
        num_inference_steps = 2
        [[generation]]
        prompt = "a red apple on a table"
        seed = 7
        """)


# ---------------------------------------------------------------------------------------------
# Choosing the device


def _accelerator(monkeypatch, found):
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *a, **k: found)


@pytest.mark.parametrize("found, chosen", [(torch.device("mps"), "mps"), (torch.device("xpu"), "xpu"),
                                           (torch.device("cuda"), "cuda"), (None, "cpu"),
                                           (types.SimpleNamespace(type="mtia"), "cpu")])
def test_auto_takes_torchs_current_accelerator(monkeypatch, found, chosen):
    _accelerator(monkeypatch, found)
    assert prepare.resolve_device("auto") == chosen


def test_auto_without_torch_accelerator_asks_each_backend(monkeypatch):
    """torch < 2.6 has no torch.accelerator: the first backend torch sees, CUDA first."""
    monkeypatch.delattr(torch, "accelerator")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert prepare.resolve_device("auto") == "mps"


@pytest.mark.parametrize("device", ["mps", "xpu", "xpu:1"])
def test_an_available_backend_is_taken_as_named(monkeypatch, device):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.xpu, "is_available", lambda: True)
    assert prepare.resolve_device(device) == device


@pytest.mark.parametrize("device, named", [("mps", r"Apple GPU \(MPS\)"), ("xpu", r"Intel GPU \(XPU\)"),
                                           ("xpu:0", r"Intel GPU \(XPU\)"), ("cuda", "CUDA or ROCm GPU")])
def test_a_missing_backend_is_one_line_naming_it(monkeypatch, device, named):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    with pytest.raises(contract.JobFileError, match=rf"^--device {device}: torch sees no {named} here[;:] .*--device cpu") as caught:
        prepare.resolve_device(device)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("device", ["mps:0", "rocm", "gpu", "xpu:a", "cuda:"])
def test_an_unknown_device_lists_the_forms(device):
    with pytest.raises(contract.JobFileError, match=r"is not one of auto, cpu, cuda, cuda:N, mps, xpu, xpu:N$"):
        prepare.resolve_device(device)


@pytest.mark.parametrize("device, named", [("mps", "MPS"), ("xpu", "XPU")])
def test_plan_on_a_machine_without_the_backend_is_one_line_exit_2(tiny_model, tmp_path, monkeypatch, device, named):
    from orchestrator.cli import app

    if prepare.backend_available(device):
        pytest.skip(f"this machine has {named}")
    job_file = job_toml(tmp_path, tiny_model)
    result = CliRunner().invoke(app, ["plan", str(job_file), "--workdir", str(tmp_path / "work"), "--device", device])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --device {device}: torch sees no ") and f"({named})" in lines[0], lines
    assert not (tmp_path / "work").exists()


def test_rocm_is_cuda_with_hip_and_is_named(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", "6.2.41133")
    assert prepare.device_kind("cuda:1") == "rocm"
    assert prepare.describe_device("cuda:1") == "device: cuda:1: AMD ROCm (HIP 6.2.41133), as torch's cuda device"
    assert memory.attention_path("cuda") == "plain"  # consumer cards have no fused kernel
    monkeypatch.setattr(torch.version, "hip", None)
    assert prepare.device_kind("cuda:1") == "cuda" and memory.attention_path("cuda") == "fused"
    assert [memory.attention_path(d) for d in ("cpu", "mps", "xpu:0")] == ["fused", "plain", "plain"]


# ---------------------------------------------------------------------------------------------
# Caps and peaks


class FakeBackend:
    """Records what a stage asks of torch.mps or torch.xpu."""

    def __init__(self):
        self.calls = []

    def current_device(self):
        return 0

    def set_device(self, device):
        self.calls.append(("set_device", torch.device(device)))

    def get_device_properties(self, device):
        return types.SimpleNamespace(total_memory=16 * GIB)

    def set_per_process_memory_fraction(self, fraction, device=None):
        self.calls.append(("fraction", fraction) + ((torch.device(device),) if device is not None else ()))

    def recommended_max_memory(self):
        return 8 * GIB

    def reset_peak_memory_stats(self, device):
        self.calls.append(("reset", torch.device(device)))

    def max_memory_allocated(self, device):
        return 3 * GIB

    def max_memory_reserved(self, device):
        return 4 * GIB


@pytest.fixture
def fake_mps(monkeypatch):
    fake = FakeBackend()
    for name in ("set_per_process_memory_fraction", "recommended_max_memory"):
        monkeypatch.setattr(torch.mps, name, getattr(fake, name))
    return fake


@pytest.fixture
def fake_xpu(monkeypatch):
    fake = FakeBackend()
    for name in ("current_device", "set_device", "get_device_properties", "set_per_process_memory_fraction",
                 "reset_peak_memory_stats", "max_memory_allocated", "max_memory_reserved"):
        monkeypatch.setattr(torch.xpu, name, getattr(fake, name))
    return fake


def test_a_stage_on_mps_caps_itself_as_a_share_of_metals_working_set(fake_mps):
    assert entry.open_device({"device": "mps", "runtime": {"budget_bytes": 6 * GIB}}) == torch.device("mps")
    entry.open_device({"device": "mps", "runtime": {"budget_bytes": 40 * GIB}})  # torch refuses more than 2.0
    entry.open_device({"device": "mps", "runtime": {}})
    assert fake_mps.calls == [("fraction", 6 / 8), ("fraction", 2.0)]


def test_a_stage_on_xpu_1_makes_it_current_and_caps_it_at_the_budget(fake_xpu):
    assert entry.open_device({"device": "xpu:1", "runtime": {"budget_bytes": 2 * GIB}}) == torch.device("xpu", 1)
    assert entry.open_device({"device": "xpu", "runtime": {}}) == torch.device("xpu", 0)
    assert fake_xpu.calls == [("set_device", torch.device("xpu", 1)), ("fraction", 2 / 16, torch.device("xpu", 1)),
                              ("set_device", torch.device("xpu", 0))]


def test_xpu_peaks_come_from_its_allocator(fake_xpu):
    device = torch.device("xpu", 0)
    measure.reset_device_peak(device)
    assert fake_xpu.calls == [("reset", device)]
    peaks = measure.peak_memory(device)
    assert peaks["device_max_allocated_bytes"] == 3 * GIB and peaks["device_max_reserved_bytes"] == 4 * GIB
    assert "host_peak_rss_bytes" in peaks


def test_the_mps_sampler_catches_a_peak_between_two_reads(monkeypatch):
    """MPS keeps no peak counter: the sampler's thread must see a transient rise that is gone
    again when the stage reads its peaks (attention scores live for milliseconds)."""
    import threading

    seen = threading.Event()
    state = {"reads": 0}

    def allocated():
        state["reads"] += 1
        if state["reads"] == 6:
            seen.set()
        return 5 * GIB if state["reads"] == 4 else GIB  # one sample sees the transient peak

    monkeypatch.setattr(torch.mps, "current_allocated_memory", allocated)
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: 2 * GIB)
    device = torch.device("mps")
    measure.reset_device_peak(device)
    try:
        assert seen.wait(10), "the sampler thread never sampled"
        assert measure.peak_memory(device)["device_max_allocated_bytes"] == 5 * GIB
        assert measure.device_peak(device)["device_max_reserved_bytes"] == 2 * GIB
        first = measure._MPS_SAMPLERS[-1]
        measure.reset_device_peak(device)  # a new start forgets the old peak and stops the old thread
        assert not first._thread.is_alive()
        assert measure.device_peak(device)["device_max_allocated_bytes"] == GIB
    finally:
        while measure._MPS_SAMPLERS:
            measure._MPS_SAMPLERS.pop().stop()


def test_the_runner_compares_mps_and_xpu_peaks_with_the_budget():
    from orchestrator.executors.runner import budget_overrun

    summary = {"peak": {"device_max_allocated_bytes": GIB, "device_max_reserved_bytes": 3 * GIB}}
    for kind in ("mps", "xpu"):
        assert "measured peak 3.00 GiB exceeded the budget 2.00 GiB" in budget_overrun(summary, {"device_type": kind, "budget_bytes": 2 * GIB})


# ---------------------------------------------------------------------------------------------
# Unified memory: one pool


@pytest.fixture
def mac_8gb(monkeypatch):
    """An 8 GB Apple-silicon Mac: Metal recommends a 5.33 GiB working set (as reported by M1/M2 Macs with 8 GB)."""
    monkeypatch.setattr(memory, "_mps_memory", lambda: (int(5.33 * GIB), 8 * GIB))


def test_the_mps_default_budget_is_one_pool_under_metals_working_set(mac_8gb):
    budget, host = memory.budgets("mps", None, None)
    assert host is None  # no second pool to check
    assert budget == int(5.33 * GIB) - memory.MPS_PROCESS_BYTES  # min(5.33, 8 - 2.5) - 1 GiB
    source = memory.budget_source("mps", None, None, budget)
    assert "recommended_max_memory()" in source and "one pool for GPU and CPU" in source, source


def test_on_mps_max_vram_and_max_ram_are_one_budget(mac_8gb):
    assert memory.budgets("mps", "6GiB", "3GiB") == (3 * GIB, None)
    assert memory.budgets("mps", None, "3GiB") == (3 * GIB, None)
    assert memory.budgets("mps", "2GiB", None) == (2 * GIB, None)
    assert memory.budget_source("mps", "6GiB", "3GiB", 3 * GIB).endswith("one pool on MPS (unified memory), the smaller taken")
    # On a small-RAM Mac whose working set would leave macOS too little, the RAM caps it.
    assert memory.default_budget("mps") <= 8 * GIB - memory.MACOS_RESERVE_BYTES - memory.MPS_PROCESS_BYTES


def test_the_xpu_default_budget_reads_the_free_memory(monkeypatch):
    asked = []
    monkeypatch.setattr(memory, "_device_free_bytes", lambda kind, index: asked.append((kind, index)) or 10 * GIB)
    assert memory.budgets("xpu:1", None, None) == (int(10 * GIB * 0.95), None)
    assert asked == [("xpu", 1)]


def _tiny_items(side=64):
    return [{"prompt": "a red apple", "negative_prompt": "", "height": side, "width": side, "use_resolution_binning": False,
             "num_inference_steps": 2, "guidance_scale": 4.5, "timesteps": None}]


def test_the_plain_path_is_counted_and_chunked_to_fit(tiny_model):
    """On MPS the score matrix is made: the estimate grows by it, and a budget the whole matrix
    breaks gets attention in query chunks (the same pixels), not a slower strategy; on CUDA the
    same job and budget need no chunks (its fused kernel makes no score matrix)."""
    from orchestrator.planning.estimate import ModelConfigs, estimate_denoise

    model = ModelConfigs.read(tiny_model)
    shapes = [(256, 256, True)]  # (256 / 8 / 2)^2 = 256 tokens; the matrix: [2 (CFG), 2 heads, 256, 256] floats
    fused = estimate_denoise(model, "float32", "mps", "resident", 1, shapes, 16)
    plain = estimate_denoise(model, "float32", "mps", "resident", 1, shapes, 16, plain=True)
    chunked = estimate_denoise(model, "float32", "mps", "resident", 1, shapes, 16, plain=True, chunk=64)
    matrix = 2 * 2 * 256 * 256 * 4
    # The scores and their softmax live together; the fused trace peaks elsewhere (the MLP), so
    # the rise is less than both matrices but more than one.
    assert plain.activation_bytes >= 2 * matrix and plain.activation_bytes - fused.activation_bytes > matrix
    assert chunked.activation_bytes < plain.activation_bytes - matrix  # a quarter of the rows at a time
    budget = (plain.peak_bytes + chunked.peak_bytes) // 2
    items = _tiny_items(256)
    on_mps = memory.choose_strategies(tiny_model, "float32", "mps", items, 16, budget)["denoise"]
    assert (on_mps.strategy, on_mps.attention_chunk) != ("resident", None) and on_mps.strategy == "resident"
    assert on_mps.peak_bytes <= budget and on_mps.runtime_entry()["attention_chunk"] == on_mps.attention_chunk
    from orchestrator.planning.estimate import CUBLAS_WORKSPACE_BYTES

    # The same budget plus what CUDA adds besides attention (cuBLAS's workspace, 512-byte blocks).
    on_cuda = memory.choose_strategies(tiny_model, "float32", "cuda", items, 16, budget + CUBLAS_WORKSPACE_BYTES + 2**16)["denoise"]
    assert on_cuda.attention_chunk is None and "attention_chunk" not in on_cuda.runtime_entry()
    assert "attention 64 queries at a time" in memory.format_plan({"denoise": chunked}, budget)
    # The VAE's mid-block attention too ([1, 1 head, 4096, 4096] at 512 px): it can make decode tile.
    from orchestrator.planning.estimate import estimate_decode

    vae_fused, vae_plain = (estimate_decode(model, "float32", "mps", None, [(512, 512, None)], plain) for plain in (False, True))
    assert vae_plain.activation_bytes - vae_fused.activation_bytes > 4096 * 4096 * 4
    # ... and decode then chunks its attention, which keeps the pixels, before it tiles, which does not.
    vae_chunked = estimate_decode(model, "float32", "mps", None, [(512, 512, None)], True, 1024)
    assert vae_chunked.peak_bytes < vae_plain.peak_bytes
    budget = (vae_plain.peak_bytes + vae_chunked.peak_bytes) // 2
    decode = memory.choose_strategies(tiny_model, "float32", "mps", _tiny_items(512), 16, budget)["decode"]
    assert (decode.strategy, decode.tile_size) == ("full", None) and decode.attention_chunk is not None


def test_plan_for_mps_on_this_machine_plans_one_pool(tiny_model, tmp_path, mac_8gb):
    """`orchestrate plan --device mps --max-vram ...` plans without a Mac, as CUDA plans do: one
    budget from both flags, no host budget, and the device named."""
    import json

    from orchestrator.cli import app

    job_file = job_toml(tmp_path, tiny_model, side=128)
    args = ["plan", str(job_file), "--workdir", str(tmp_path / "work"), "--device", "mps", "--max-vram", "6GiB", "--max-ram", "4GiB"]
    result = CliRunner().invoke(app, args + ["--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["device_type"] == "mps" and plan["budget_bytes"] == 4 * GIB and plan["host_budget_bytes"] is None
    table = CliRunner().invoke(app, args)
    assert table.exit_code == 0, table.output
    assert "device: mps: Apple Metal (MPS), memory shared with the CPU" in table.output
    assert "budget 4.00 GiB (--max-vram 6GiB and --max-ram 4GiB: one pool on MPS (unified memory), the smaller taken)" in table.output


# ---------------------------------------------------------------------------------------------
# Chunked attention: the same pixels


def test_chunked_attention_gives_the_same_pixels_bit_for_bit_on_the_cpu(tiny_model, tmp_path):
    """Denoise and decode planned with attention in chunks of 64 queries (256 tokens in the
    transformer at 256 px: 4 chunks; 1024 in the VAE's mid-block: 16) write the same latents and
    the same PNG, byte for byte, as the default processor in float32 on the CPU."""
    job_file = job_toml(tmp_path, tiny_model, side=256)
    stages = {"denoise": {"strategy": "resident", "batch_size": 1, "attention_chunk": 64},
              "decode": {"strategy": "full", "tile_size": None, "batch_size": 1, "attention_chunk": 64}}
    made = {}
    for name, runtime in {"whole": None, "chunked": {"budget_bytes": None, "stages": stages}}.items():
        job_dir, runs, _ = run_inprocess(job_file, tmp_path / name, device="cpu", runtime=runtime)
        outputs = sorted((job_dir / "denoise").glob("*.safetensors")) + sorted((job_dir / "decode").glob("*.png"))
        assert len(outputs) == 2
        made[name] = [path.read_bytes() for path in outputs]
    assert made["chunked"][0] == made["whole"][0]  # latents
    assert made["chunked"][1] == made["whole"][1]  # PNG


def test_the_chunked_processor_is_installed_when_planned(tiny_model):
    from diffusers import PixArtTransformer2DModel

    from stages.backends import ChunkedAttnProcessor, use_chunked_attention

    transformer = PixArtTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer")
    use_chunked_attention(transformer, None)
    assert not any(isinstance(p, ChunkedAttnProcessor) for p in transformer.attn_processors.values())
    use_chunked_attention(transformer, 64)
    assert all(isinstance(p, ChunkedAttnProcessor) and p.chunk_size == 64 for p in transformer.attn_processors.values())
    with pytest.raises(ValueError, match="at least 2"):
        ChunkedAttnProcessor(1)


# ---------------------------------------------------------------------------------------------
# No float64 on MPS and XPU


def test_no_float64_is_made_on_a_device_without_it(tiny_model, monkeypatch):
    """At a size other than the model's own, diffusers builds the transformer's position table in
    float64 on the latents' device. On MPS and XPU the stage builds it on the CPU first: the loop
    then makes no float64 tensor, and the latents stay the same bit for bit. The CPU plays such a
    device here (NO_FLOAT64), and the same run without it shows the float64 table being made."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    from stages import backends, denoise

    made, placing = [], []

    class Float64Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not placing and any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in tree_leaves(out)):
                made.append(str(func))
            return out

    real = backends.place_position_table

    def on_the_host(*args):  # what it computes is on the CPU by design: not counted
        placing.append(True)
        try:
            real(*args)
        finally:
            placing.clear()

    monkeypatch.setattr(backends, "place_position_table", on_the_host)
    embeds = {"prompt_embeds": torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(0)),
              "prompt_attention_mask": torch.ones(1, 16, dtype=torch.long)}
    item = {"guidance_scale": 1.0, "num_inference_steps": 2, "seed": 3, "timesteps": None}

    def latents(no_float64):
        monkeypatch.setattr(backends, "NO_FLOAT64", no_float64)
        transformer, new_scheduler, _ = denoise.load_transformer({"model": {"path": str(tiny_model)}, "dtype": "float32"}, torch.device("cpu"))
        made.clear()
        with Float64Spy():
            *_, (_, _, out) = denoise.generate_latents(transformer, new_scheduler(), [embeds], [item], 128, 96, 8,
                                                       torch.device("cpu"), torch.float32)
        return out, list(made)

    plain, made_plain = latents(())
    kept, made_kept = latents(("cpu",))
    assert made_plain, "diffusers no longer makes float64 here: the test guards nothing"
    assert made_kept == []
    assert torch.equal(plain, kept)


def test_on_mps_weights_kept_on_the_host_come_out_of_the_same_pool(tiny_model):
    """Offloading the transformer to host memory saves nothing on unified memory: on MPS a
    strategy's host-kept weights count against the one budget; on CUDA they do not."""
    from orchestrator.planning.estimate import ModelConfigs, estimate_denoise, estimate_encode, estimate_host_bytes

    model = ModelConfigs.read(tiny_model)
    offload = estimate_denoise(model, "float32", "mps", "offload", 1, [(64, 64, True)], 16)
    stream = estimate_encode(model, "float32", "mps", "stream", 1, 16)
    resident = estimate_denoise(model, "float32", "mps", "resident", 1, [(64, 64, True)], 16)
    whole = estimate_host_bytes(model, "float32", offload)
    assert whole > 0 and memory.pool_bytes(model, "float32", "mps", offload) == offload.peak_bytes + whole
    assert memory.pool_bytes(model, "float32", "mps", stream) == stream.peak_bytes + estimate_host_bytes(model, "float32", stream)
    assert memory.pool_bytes(model, "float32", "mps", resident) == resident.peak_bytes
    assert memory.pool_bytes(model, "float32", "cuda", offload) == offload.peak_bytes
    # Planned: a budget that holds offload's device peak but not its host-kept weights holds no offload on MPS.
    chosen = memory.choose_strategies(tiny_model, "float32", "mps", _tiny_items(64), 16, offload.peak_bytes)["denoise"]
    assert isinstance(chosen, memory.NoFit) or chosen.strategy == "resident"
