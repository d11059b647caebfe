"""Guards the CUDA-only paths of the stages, simulated on the CPU (issue 8, points 2, 5, 6): the
device a stage opens is made current and capped at the job's budget; cuBLAS and cuDNN allocation
failures are out-of-memory (exit 3, items kept), not tracebacks; a failing group offload names
diffusers, not an incomplete model folder."""

from __future__ import annotations

import types

import pytest
import torch

from stages import contract, entry

GIB = 1024**3


class FakeCuda:
    """Records what a stage asks of torch.cuda; a 16 GiB card whose current device is 0."""

    def __init__(self):
        self.calls = []

    def current_device(self):
        return 0

    def set_device(self, device):
        self.calls.append(("set_device", torch.device(device)))

    def get_device_properties(self, device):
        return types.SimpleNamespace(total_memory=16 * GIB)

    def set_per_process_memory_fraction(self, fraction, device):
        self.calls.append(("fraction", fraction, torch.device(device)))


@pytest.fixture
def fake_cuda(monkeypatch):
    fake = FakeCuda()
    for name in ("current_device", "set_device", "get_device_properties", "set_per_process_memory_fraction"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    return fake


def test_a_stage_on_cuda_1_makes_it_current_and_caps_it_at_the_budget(fake_cuda):
    device = entry.open_device({"device": "cuda:1", "runtime": {"budget_bytes": 2 * GIB}})
    assert device == torch.device("cuda", 1)
    assert fake_cuda.calls == [("set_device", torch.device("cuda", 1)), ("fraction", 2 / 16, torch.device("cuda", 1))]


def test_plain_cuda_means_the_current_device_and_no_budget_means_no_cap(fake_cuda):
    assert entry.open_device({"device": "cuda", "runtime": {}}) == torch.device("cuda", 0)
    assert fake_cuda.calls == [("set_device", torch.device("cuda", 0))]


def test_a_budget_over_the_card_caps_at_the_whole_card(fake_cuda):
    entry.open_device({"device": "cuda:0", "runtime": {"budget_bytes": 40 * GIB}})
    assert fake_cuda.calls[-1] == ("fraction", 1.0, torch.device("cuda", 0))


def test_the_cpu_touches_no_cuda_call(fake_cuda):
    assert entry.open_device({"device": "cpu", "runtime": {"budget_bytes": GIB}}) == torch.device("cpu")
    assert fake_cuda.calls == []


@pytest.mark.parametrize("said", [
    "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
    "cuDNN error: CUDNN_STATUS_NOT_ENOUGH_WORKSPACE",
    "MPS backend out of memory (MPS allocated: 1.00 GB)",
])
def test_library_allocation_failures_are_out_of_memory(said):
    job = {"runtime": {"budget_bytes": GIB}}
    unit = types.SimpleNamespace(stage="decode", items=["0001-a"])
    with pytest.raises(contract.ResourceError, match=r"^decode: out of memory on item 0001-a \(budget 1\.00 GiB"):
        with entry.oom_guard(job, unit):
            raise RuntimeError(said)


def test_other_runtime_errors_are_not_out_of_memory():
    unit = types.SimpleNamespace(stage="decode", items=["0001-a"])
    with pytest.raises(RuntimeError, match="shape mismatch"):
        with entry.oom_guard({}, unit):
            raise RuntimeError("shape mismatch")


def test_a_failing_group_offload_names_diffusers_not_the_model_folder(tiny_model, monkeypatch):
    from diffusers import PixArtTransformer2DModel

    from stages import denoise

    def failing(self, *args, **kwargs):
        raise ValueError("Group offloading requires a CUDA stream")

    monkeypatch.setattr(PixArtTransformer2DModel, "enable_group_offload", failing)
    job = {"model": {"path": str(tiny_model)}, "dtype": "float32"}
    with pytest.raises(contract.ResourceError, match="group offloading failed.*diffusers >= 0.33") as caught:
        denoise.load_transformer(job, torch.device("cuda", 0), "offload")  # group offload is the CUDA path
    assert "model folder" not in str(caught.value)


def test_resident_t5_on_cuda_loads_straight_to_the_device(tiny_model, monkeypatch):
    """Issue 8, point 8: on a GPU the resident T5 is placed by from_pretrained's device_map, so the
    host never materialises the whole model; on the CPU nothing changes."""
    from transformers import T5EncoderModel

    from stages import encode

    seen = []
    real = T5EncoderModel.from_pretrained.__func__

    def recording(cls, *args, **kwargs):
        seen.append(kwargs.get("device_map"))
        kwargs.pop("device_map", None)  # no GPU here: load on the CPU, as the recorded call would on the card
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(T5EncoderModel, "from_pretrained", classmethod(recording))
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: self)
    job = {"model": {"path": str(tiny_model)}, "dtype": "float32"}
    encode.load_text_encoder(job, torch.device("cuda", 1))
    encode.load_text_encoder(job, torch.device("cpu"))
    assert seen == ["cuda:1", None]


def test_the_default_budget_subtracts_the_cuda_context_once(monkeypatch):
    """Issue 8, point 7: the free memory is read in a fresh process that has already made its own
    CUDA context, so the stage's context is out of the figure; the default keeps 5% back for
    fragmentation and nothing more, and says how it was computed."""
    from orchestrator.planning import memory

    asked = []
    monkeypatch.setattr(memory, "_cuda_free_bytes", lambda index: asked.append(index) or 20 * GIB)
    budget, host = memory.budgets("cuda:1", None, None)
    assert asked == [1] and host is None
    assert budget == int(20 * GIB * 0.95)  # 19.00 GiB: not 18.5 (context taken twice)
    source = memory.budget_source("cuda:1", None, None, budget)
    assert source.startswith("default: 95% of the 20.00 GiB a fresh process sees free on cuda:1"), source
    assert memory.budget_source("cuda", "2GiB", None, 2 * GIB) == "--max-vram 2GiB"
    runtime = {"budget_bytes": budget, "budget_source": source,
               "stages": {"encode": {"strategy": "resident", "batch_size": 4, "peak_bytes": GIB}}}
    assert memory.describe_runtime(runtime).startswith(f"memory: budget 19.00 GiB ({source}): encode resident")
