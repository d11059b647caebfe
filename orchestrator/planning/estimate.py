"""Memory estimates: the peak device bytes of each stage's strategies, from the model's configs.

Estimates come from the model's config files alone; no weight file is opened, so `orchestrate plan`
works on a folder holding only configs. Each model is built on the `meta` device, its parameters and
buffers are replaced by FakeTensors on the CPU device (shapes and dtypes, no data), and the stage's
own computation runs on them under a dispatch mode that adds up the bytes of every storage made and
subtracts them when the storage dies (PIXART-NOTES.md, "Memory: sizes and estimates"):

    peak_bytes = weights on the device (from the parameters and buffers, tied ones once)
               + the counter's peak (inputs and activations made on the device)
               + a workspace margin (CUDA: cuBLAS, and cuDNN for decode; CPU: 0)

tests/test_memory_estimate.py holds these within 5% of torch.profiler's measured peak on the CPU.

What is on the device at each strategy's peak; the stages keep to this (docs/memory.md):
- encode `resident`: the whole T5 (fp16 keeps the 24 `wo` matrices in fp32 as `from_pretrained`
  does; bf16 does not), one text's `encode_prompt` at batch 1, and the outputs of the batch:
  `batch_size` texts' embeddings [1, seq, dim] and masks [1, seq] kept on the device together.
- encode `stream`: the embedding lookup runs on the host. On the device: one T5 block on CUDA (the
  next is read ahead into host memory), two on the CPU (same memory), the final norm, per text of the batch its hidden
  state [1, seq, dim], its attention mask [1, 1, seq, seq] and the position bias [1, heads, seq,
  seq] block 0 made for it; and one text's forward through one block at batch 1. At the end, the
  batch's final-norm outputs while the hidden states are still held.
- denoise `resident`: the whole transformer and one step of the loop at batch `batch_size` x (2
  with guidance): the forward, its inputs, and what the loop keeps across steps (latents,
  DPM-Solver's two model outputs, the previous step's output and guided noise).
- denoise `offload`: the non-block modules, BLOCKS_HELD (2) transformer blocks, and the same step.
- decode `full` / `tiled`: the whole VAE (its encoder too: `from_pretrained` loads it) and one
  `vae.decode` at batch 1, untiled or with diffusers tiling (`enable_tiling()`, then
  `tile_sample_min_size = tile_size`, `tile_latent_min_size = tile_size // 8`; overlap 0.25),
  then the resize back from the bin and postprocess's [-1, 1] -> [0, 1] on the device.
Not counted: the CUDA context (memory.CUDA_CONTEXT_BYTES; max_memory_allocated does not see it),
memory the caching allocator reserves but has not handed out, the process itself on the CPU (~0.5
GiB of interpreter and libraries), and host-side copies on CUDA (blocks read and cast on the host).

Attention: the CPU device picks `_scaled_dot_product_flash_attention_for_cpu` for every SDPA call
(masks too); its output and fp32 logsumexp have the sizes of what a GPU's flash or memory-efficient
kernel returns, so the same trace stands for CUDA. Backends without such a kernel (MPS, consumer
ROCm cards; memory.attention_path) run the plain path, which materialises the [B, heads, 4096, 4096]
scores (5.38 instead of 1.36 GiB for denoise at 1024 px): with `plain`, denoise and decode are
traced with PlainAttention, which makes the scores and their softmax as torch's math path does
(`_scaled_dot_product_attention_math`: upcast to float32, matmul, mask added in place, softmax,
matmul), on
`chunk` queries at a time when the plan chunks attention (stages/backends.py).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import weakref
from dataclasses import dataclass
from pathlib import Path

from stages.contract import JobFileError
from stages.files import MAX_CONFIG_BYTES, read_text_limited

MIB = 1024**2
# The CUDA caching allocator rounds every block up to a multiple of 512 B (kMinBlockSize), and
# max_memory_allocated counts the rounded sizes.
CUDA_BLOCK_BYTES = 512
# cuBLAS workspace, allocated through the caching allocator, so it is in max_memory_allocated:
# PyTorch's default CUBLAS_WORKSPACE_CONFIG gives 32 MiB per stream on Hopper (~8 MiB before),
# cuBLASLt 1 MiB more. The prefetch stream only copies, so one workspace.
CUBLAS_WORKSPACE_BYTES = 32 * MIB
# cuDNN convolution workspace (decode only). cuDNN picks among algorithms by the workspace it can
# allocate, so under a memory cap (torch.cuda.set_per_process_memory_fraction) it falls back to a
# leaner algorithm; this is what we leave for it, not its maximum.
CUDNN_WORKSPACE_BYTES = 64 * MIB
# oneDNN (CPU convolutions) reorders inputs, weights and outputs into layouts with channels padded
# to blocks of 16 on AVX-512 machines and of 8 on AVX2 machines while a convolution runs (see
# onednn_channel_block).
# Blocks of a streamed (encode) or offloaded (denoise) model held at once: the current one and the
# next, read ahead while the current one computes. On the CPU the read-ahead sits in the same
# memory; on CUDA the encode stage reads ahead into host memory (stages/weights.py BlockLoader), so
# the device holds one T5 block, while denoise's group offloading copies the next block in on a
# side stream, so the device holds two transformer blocks.
BLOCKS_HELD = 2


def _blocks_held(part: str, device_type: str) -> int:
    # Off the CPU (CUDA, and MPS and XPU alike) the encode stage reads ahead into host memory.
    return 1 if part == "text_encoder" and device_type != "cpu" else BLOCKS_HELD
# Activations are simulated on models cut to their first blocks (see _fake_model).
ACTIVATION_DEPTH = 2


# ---------------------------------------------------------------------------------------------
# Counting bytes


@dataclass(frozen=True)
class Estimate:
    """One candidate for one stage: what it keeps on the device at its peak, in bytes."""

    stage: str
    strategy: str
    batch_size: int
    weights_bytes: int
    activation_bytes: int
    workspace_bytes: int
    tile_size: int | None = None
    retry: Estimate | None = None  # decode in 16 bits: the float32 retry of an item whose output overflowed
    attention_chunk: int | None = None  # denoise: queries per attention call (stages/backends.py); None: all
    # encode on CUDA: the embeddings it keeps on the host between units (stages/embedding_cache.py);
    # on the CPU they are in activation_bytes, since there the host is the budget
    host_kept_bytes: int = 0

    @property
    def peak_bytes(self) -> int:
        return self.weights_bytes + self.activation_bytes + self.workspace_bytes

    def runtime_entry(self) -> dict:
        entry = {"strategy": self.strategy, "batch_size": self.batch_size, "peak_bytes": self.peak_bytes}
        if self.attention_chunk:
            entry["attention_chunk"] = self.attention_chunk
        if self.stage != "decode":
            return entry
        entry["tile_size"] = self.tile_size
        if self.retry is not None:
            entry["upcast_retry"] = {"tile_size": self.retry.tile_size, "peak_bytes": self.retry.peak_bytes}
        return entry


def _rounded(nbytes: int, round_to: int) -> int:
    return -(-nbytes // round_to) * round_to if round_to > 1 else nbytes


def _make_live_bytes():
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class LiveBytes(TorchDispatchMode):
        """Live and peak bytes of the storages created while active (views and in-place results
        share a storage and count once; `known` storages, the weights, never count). On the CPU a
        convolution also counts oneDNN's transient reorders of its input, weight and output."""

        def __init__(self, round_to: int, known: set, cpu_conv_scratch: bool) -> None:
            super().__init__()
            self.round_to, self.known, self.cpu_conv_scratch = round_to, known, cpu_conv_scratch
            self.sizes: dict[int, int] = {}
            self.now = self.peak = 0

        def track(self, tensor) -> None:
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key in self.sizes or key in self.known:
                return
            self.sizes[key] = _rounded(storage.nbytes(), self.round_to)
            self.now += self.sizes[key]
            self.peak = max(self.peak, self.now)
            weakref.finalize(storage, self._free, key)

        def _free(self, key: int) -> None:
            self.now -= self.sizes.pop(key)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if self.cpu_conv_scratch and func is torch.ops.aten.convolution.default:
                self.peak = max(self.peak, self.now + _onednn_scratch(args[0], args[1], out))
            for leaf in tree_leaves(out):
                if isinstance(leaf, torch.Tensor):
                    self.track(leaf)
            return out

    return LiveBytes


@functools.lru_cache(maxsize=1)
def onednn_channel_block() -> int:
    """16 where oneDNN runs AVX-512 kernels, else 8. oneDNN picks its ISA itself, capped by
    ONEDNN_MAX_CPU_ISA; PyTorch's CPU capability tells what the machine offers."""
    import os

    import torch

    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    if cap and not cap.upper().startswith(("AVX512", "AVX10", "ALL")):
        return 8
    return 16 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 8


def _onednn_scratch(x, weight, out) -> int:
    """Most bytes a CPU convolution holds at once besides what was live before it, as oneDNN runs
    it (measured with torch.profiler for 1-64 channels, on AVX-512 and on AVX2): the input reordered (not for a
    kxk kernel over fewer than 16 channels, which reads the plain layout), the weight reordered and
    the output in the blocked layout; then the blocked and the plain output. Channels are padded
    to onednn_channel_block(). A 1x1 kernel over fewer than 8 channels runs as a plain GEMM."""
    block = onednn_channel_block()

    def padded(c: int) -> int:
        return _rounded(c, block)

    size = x.element_size()
    c_in, c_out, kernel = x.shape[1], out.shape[1], weight.numel() // (weight.shape[0] * weight.shape[1])
    out_bytes = out.numel() * size
    if kernel == 1 and c_in < 8:
        return out_bytes
    x_bytes = 0 if kernel > 1 and c_in < block else x.numel() // c_in * padded(c_in) * size
    w_bytes = kernel * padded(c_out) * padded(c_in) * size
    blocked = out_bytes // c_out * padded(c_out)
    return max(x_bytes + w_bytes + blocked, blocked + out_bytes)


def _fake(module, dtype, keep_fp32: tuple = ()):
    """Replace parameters and buffers by FakeTensors on the CPU device, floating ones in `dtype`
    (fp32 in modules named in `keep_fp32`), keeping tied ones tied: Module.to_empty would untie
    T5's shared embedding and count it twice."""
    import torch

    made: dict[int, torch.Tensor] = {}
    for name, sub in module.named_modules():
        sub_dtype = torch.float32 if name.rsplit(".", 1)[-1] in keep_fp32 else dtype
        for table in (sub._parameters, sub._buffers):
            for key, tensor in table.items():
                if tensor is None:
                    continue
                if id(tensor) not in made:
                    empty = torch.empty(tensor.shape, dtype=sub_dtype if tensor.is_floating_point() else tensor.dtype, device="cpu")
                    made[id(tensor)] = torch.nn.Parameter(empty, requires_grad=False) if table is sub._parameters else empty
                table[key] = made[id(tensor)]
    return module


def _tensor_bytes(module, round_to: int) -> int:
    """Bytes of a module's parameters and buffers, each storage once, as the allocator counts them."""
    storages = {}
    for tensor in list(module.parameters()) + list(module.buffers()):
        storage = tensor.untyped_storage()
        storages[storage._cdata] = _rounded(storage.nbytes(), round_to)
    return sum(storages.values())


def _known_storages(module) -> set:
    return {t.untyped_storage()._cdata for t in list(module.parameters()) + list(module.buffers())}


# ---------------------------------------------------------------------------------------------
# The three models, built from their configs on fake tensors (cached: building T5-XXL takes ~1 s)


def _read_config(model_path: Path, part: str) -> str:
    path = Path(model_path) / part / "config.json"
    try:
        text = read_text_limited(path, MAX_CONFIG_BYTES, "model config", fix="the model folder is damaged; download it again")
        json.loads(text)
    except (OSError, json.JSONDecodeError) as exc:
        raise JobFileError(f"{path} cannot be read as JSON ({exc}); the model folder is damaged") from None
    return text


def _init_kwargs(cls, config: dict) -> dict:
    """The config keys the class's __init__ takes (diffusers warns about the others)."""
    accepted = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in config.items() if k in accepted}


@functools.lru_cache(maxsize=16)
def _fake_model(part: str, config_text: str, dtype_name: str, depth: int | None = None):
    """(FakeTensorMode, module) for text_encoder, transformer or vae, in eval mode. `depth` cuts
    T5 and the transformer to their first blocks: activations are freed block by block and every
    block after the first is alike, so two blocks peak like all of them, at a fraction of the time."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from stages.resolved import torch_dtype

    dtype = torch_dtype(dtype_name)
    config = json.loads(config_text)
    if depth is not None:
        config["num_layers"] = min(depth, config["num_layers"])
    keep_fp32 = ()
    with torch.device("meta"):  # not accelerate's init_empty_weights: it unties T5's embedding
        if part == "text_encoder":
            from transformers import T5Config, T5EncoderModel

            # The attention from_pretrained picks by default: SDPA where this transformers' T5 has it
            # (5.x after the attention-interface port), else eager, whose attention matrices count.
            attention = "sdpa" if getattr(T5EncoderModel, "_supports_sdpa", False) else "eager"
            module = T5EncoderModel(T5Config(**{k: v for k, v in config.items() if not k.startswith("_")}, attn_implementation=attention))
            # from_pretrained ties the encoder's embedding to `shared`; a model built from its config
            # is tied already in recent transformers, not in 5.0: tie it here, as it will be loaded.
            module.encoder.embed_tokens = module.shared
            # transformers' _keep_in_fp32_modules = ["wo"], applied by from_pretrained for fp16 only
            keep_fp32 = ("wo",) if dtype == torch.float16 else ()
        elif part == "transformer":
            from diffusers import PixArtTransformer2DModel

            module = PixArtTransformer2DModel(**_init_kwargs(PixArtTransformer2DModel, config))
        else:
            from diffusers import AutoencoderKL

            module = AutoencoderKL(**_init_kwargs(AutoencoderKL, config))
            # Blending tiles runs a Python loop over rows (seconds on fake tensors) and writes into
            # the tile in place; its temporaries are single rows, so skipping it changes no peak.
            module.blend_v = module.blend_h = lambda a, b, blend_extent: b
            module.decoder = _make_replaying_decoder()(module.decoder)
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    with mode:
        _fake(module.eval(), dtype, keep_fp32)
    return mode, module


def _make_replaying_decoder():
    import torch

    class ReplayingDecoder(torch.nn.Module):
        """The VAE decoder, run once per tile shape; a repeat (tiled decode runs up to 36 tiles)
        replays the first run's rise above the live bytes and returns an output of its shape."""

        def __init__(self, decoder) -> None:
            super().__init__()
            self.inner = decoder
            self.counter, self.seen = None, {}

        def start(self, counter) -> None:
            self.counter, self.seen = counter, {}

        def forward(self, z, *args, **kwargs):
            counter, key = self.counter, (tuple(z.shape), z.dtype)
            if key in self.seen:
                rise, shape, dtype = self.seen[key]
                counter.peak = max(counter.peak, counter.now + rise)
                return torch.empty(shape, dtype=dtype)
            now, peak = counter.now, counter.peak
            counter.peak = now
            out = self.inner(z, *args, **kwargs)
            self.seen[key] = (counter.peak - now, out.shape, out.dtype)
            counter.peak = max(counter.peak, peak)
            return out

    return ReplayingDecoder


def _make_plain_attention():
    from stages.backends import ChunkedAttnProcessor

    class PlainAttention(ChunkedAttnProcessor):
        """SDPA's plain path, as torch's math kernel runs it: in float32 (since torch 2.5 it upcasts
        float16 and bfloat16 unless allow_fp16_bf16_reduction_math_sdp is set), the scores
        [B, heads, q, k] are made, the mask added in place, and the softmax made beside them
        before the scores are freed. That is PIXART-NOTES.md's 5.38 GiB for denoise at 1024 px."""

        def attend(self, query, key, value, mask):
            import torch

            dtype = query.dtype
            query, key, value = (t.to(torch.float32) for t in (query, key, value))
            scores = query @ (key.transpose(-2, -1) * query.shape[-1] ** -0.5)  # [B, heads, q, k], float32
            if mask is not None:
                scores.add_(mask)
            probs = scores.softmax(dim=-1)
            del scores
            return (probs @ value).to(dtype)  # [B, heads, q, d]

    return PlainAttention


@contextlib.contextmanager
def _attention(module, plain: bool, chunk: int | None):
    """Trace `module` with the plain path's attention (on `chunk` queries at a time), then give it
    back diffusers' default processor: the fake models are cached and shared."""
    if not plain:
        yield
        return
    from diffusers.models.attention_processor import AttnProcessor2_0

    module.set_attn_processor(_make_plain_attention()(chunk))
    try:
        yield
    finally:
        module.set_attn_processor(AttnProcessor2_0())


def _counter(module, device_type: str):
    round_to = CUDA_BLOCK_BYTES if device_type == "cuda" else 1
    return _make_live_bytes()(round_to, _known_storages(module), cpu_conv_scratch=device_type == "cpu")


# ---------------------------------------------------------------------------------------------
# The stages' computations, on fake tensors: each returns the counter's peak (activations)


@functools.lru_cache(maxsize=64)
def _encode_phases(config_text: str, dtype_name: str, device_type: str, strategy: str, seq_len: int, texts: int) -> tuple:
    """Peak activation bytes of each phase of encoding `texts` texts with `strategy` (module
    docstring): resident has one phase; stream has the blocks, then the final norm. Each phase's
    peak grows linearly with the texts, so two runs (1 and 2 texts) give it for any batch."""
    import torch
    from transformers.masking_utils import create_bidirectional_mask

    from stages.resolved import torch_dtype

    mode, model = _fake_model("text_encoder", config_text, dtype_name, ACTIVATION_DEPTH)
    dtype = torch_dtype(dtype_name)
    counter = _counter(model, device_type)
    with torch.no_grad(), mode, counter:
        if strategy == "resident":  # encode_prompt per text, its outputs kept until the batch is written
            kept = []
            for _ in range(texts):
                ids, mask = torch.zeros(1, seq_len, dtype=torch.long), torch.ones(1, seq_len, dtype=torch.long)
                embeds = model(ids, attention_mask=mask)[0].to(dtype)  # [1, seq, dim]
                kept.append((embeds.repeat(1, 1, 1), mask.repeat(1, 1)))  # encode_prompt's num_images_per_prompt copies
                del ids, mask, embeds
            return (counter.peak,)
        hidden, attention, bias = [], [], []
        for _ in range(texts):
            hidden.append(torch.empty(1, seq_len, model.config.d_model, dtype=dtype))  # the host's lookup, moved over
            mask = torch.ones(1, seq_len, dtype=torch.long)
            attention.append(create_bidirectional_mask(model.config, hidden[-1], mask))  # positional: see stages/encode.py
            bias.append(None)
            del mask
        for block in model.encoder.block:  # block 0 makes each text's position bias; the rest are alike
            for t in range(texts):
                hidden[t], bias[t], _ = block(hidden[t], attention[t], bias[t], None, None, None, cache=None)
        blocks_peak, counter.peak = counter.peak, counter.now
        finals = [model.encoder.final_layer_norm(h).to(dtype) for h in hidden]  # [1, seq, dim] each
        del finals
        return blocks_peak, counter.peak


def _denoise_step(transformer, batch: int, cfg: bool, height: int, width: int, scale: int, seq_len: int, dtype):
    """One step of the denoise loop in its steady state (step 3 on), as stages/denoise.py and the
    pipeline run it. Besides the forward's inputs, the loop keeps alive the latents, DPM-Solver's
    two previous model outputs, and the previous step's transformer output (its CFG chunks stay
    referenced) and guided noise."""
    import torch

    rows = batch * (2 if cfg else 1)
    config = transformer.config
    h, w = height // scale, width // scale
    latents = torch.empty(batch, config.in_channels, h, w, dtype=dtype)  # [b, C, h, w]
    kept = [torch.empty_like(latents) for _ in range(2)]  # DPMSolverMultistepScheduler.model_outputs (order 2)
    kept.append(torch.empty(rows, config.out_channels, h, w, dtype=dtype))  # last step's output [rows, 2C, h, w]
    if cfg:
        kept.append(torch.empty(batch, config.out_channels, h, w, dtype=dtype))  # last step's guided noise
    prompt_embeds = torch.empty(rows, seq_len, config.caption_channels, dtype=dtype)  # [rows, seq, dim]
    prompt_mask = torch.ones(rows, seq_len, dtype=torch.long)
    added = {"resolution": None, "aspect_ratio": None}
    if config.sample_size == 128:
        added = {"resolution": torch.empty(rows, 2, dtype=dtype), "aspect_ratio": torch.empty(rows, 1, dtype=dtype)}
    model_input = torch.cat([latents] * 2) if cfg else latents
    timestep = torch.empty(rows, dtype=torch.float32)
    noise_pred = transformer(model_input, encoder_hidden_states=prompt_embeds, encoder_attention_mask=prompt_mask,
                             timestep=timestep, added_cond_kwargs=added, return_dict=False)[0]  # [rows, 2C, h, w]
    if cfg:
        uncond, text = noise_pred.chunk(2)
        noise_pred = uncond + 4.5 * (text - uncond)
    return noise_pred, kept


@functools.lru_cache(maxsize=128)
def _denoise_activations(config_text: str, dtype_name: str, device_type: str, batch: int, cfg: bool,
                         height: int, width: int, scale: int, seq_len: int, plain: bool = False, chunk: int | None = None) -> int:
    """Peak activation bytes of one step at this (binned) size; the same for resident and offload."""
    import torch

    from stages.resolved import torch_dtype

    mode, model = _fake_model("transformer", config_text, dtype_name, ACTIVATION_DEPTH)
    counter = _counter(model, device_type)
    with _attention(model, plain, chunk), torch.no_grad(), mode, counter:
        _denoise_step(model, batch, cfg, height, width, scale, seq_len, torch_dtype(dtype_name))
    return counter.peak


def _decode_image(vae, height: int, width: int, requested: tuple | None, tile_size: int | None, dtype):
    """One item's decode as stages/decode.py runs it, on the device: decode, resize, denormalize."""
    import torch

    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    vae.use_tiling = tile_size is not None
    if tile_size is not None:
        vae.tile_sample_min_size = tile_size
        vae.tile_latent_min_size = tile_size // scale
    latents = torch.empty(1, vae.config.latent_channels, height // scale, width // scale, dtype=dtype)
    image = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]  # [1, 3, H, W]
    del latents
    if requested is not None:
        from diffusers.image_processor import PixArtImageProcessor

        image = PixArtImageProcessor.resize_and_crop_tensor(image, requested[1], requested[0])
    return (image / 2 + 0.5).clamp(0, 1)


@functools.lru_cache(maxsize=128)
def _decode_activations(config_text: str, dtype_name: str, device_type: str, height: int, width: int,
                        requested: tuple | None, tile_size: int | None, plain: bool = False, chunk: int | None = None) -> int:
    import torch

    from stages.resolved import torch_dtype

    mode, vae = _fake_model("vae", config_text, dtype_name)
    counter = _counter(vae, device_type)
    vae.decoder.start(counter)
    try:
        with _attention(vae, plain, chunk), torch.no_grad(), mode, counter:
            _decode_image(vae, height, width, requested, tile_size, torch_dtype(dtype_name))
    finally:
        vae.use_tiling = False
    return counter.peak


# ---------------------------------------------------------------------------------------------
# Weights on the device, per strategy


@functools.lru_cache(maxsize=32)
def _weights(part: str, config_text: str, dtype_name: str, device_type: str, strategy: str) -> int:
    _, model = _fake_model(part, config_text, dtype_name)
    round_to = CUDA_BLOCK_BYTES if device_type == "cuda" else 1
    if strategy in ("stream", "offload"):
        blocks = model.encoder.block if part == "text_encoder" else model.transformer_blocks
        largest = max(_tensor_bytes(block, round_to) for block in blocks)
        if part == "text_encoder":
            rest = _tensor_bytes(model.encoder.final_layer_norm, round_to)  # the embedding stays on the host
        else:
            rest = _tensor_bytes(model, round_to) - sum(_tensor_bytes(block, round_to) for block in blocks)
        return rest + _blocks_held(part, device_type) * largest
    return _tensor_bytes(model, round_to)


def _workspace(stage: str, device_type: str) -> int:
    if device_type != "cuda":
        return 0  # CPU scratch (oneDNN reorders) is counted with the activations
    return CUBLAS_WORKSPACE_BYTES + (CUDNN_WORKSPACE_BYTES if stage == "decode" else 0)


@functools.lru_cache(maxsize=32)
def _host_weights(part: str, config_text: str, dtype_name: str, strategy: str) -> int:
    """Host bytes of weights a CUDA stage holds at its peak (docs/memory.md, "Host memory on CUDA"):
    the resident T5 goes straight to the device (device_map), a streamed T5 keeps its embedding
    table on the host for the lookup plus the block read ahead; the transformer and the VAE are
    loaded on the host and then moved (resident), or stay there (group offloading)."""
    _, model = _fake_model(part, config_text, dtype_name)
    if part == "text_encoder":
        if strategy == "resident":
            return 0
        return _tensor_bytes(model.shared, 1) + max(_tensor_bytes(block, 1) for block in model.encoder.block)
    return _tensor_bytes(model, 1)


def estimate_host_bytes(model: ModelConfigs, dtype: str, estimate: Estimate) -> int:
    """Host memory a CUDA stage needs for weights under the estimate's strategy, and encode's kept
    embeddings (not counting the interpreter and libraries, ~0.5-1 GiB per process)."""
    part, config = {"encode": ("text_encoder", model.encode), "denoise": ("transformer", model.denoise),
                    "decode": ("vae", model.decode)}[estimate.stage]
    return _host_weights(part, config, dtype, estimate.strategy) + estimate.host_kept_bytes


@dataclass(frozen=True)
class ModelConfigs:
    """A model folder's three config texts, as read once for planning."""

    encode: str
    denoise: str
    decode: str

    @classmethod
    def read(cls, model_path) -> ModelConfigs:
        """From one model folder, or from {component: folder holding <component>/} (composed models)."""
        roots = model_path if isinstance(model_path, dict) else {}
        return cls(*(_read_config(roots.get(part, model_path), part) for part in ("text_encoder", "transformer", "vae")))

    @property
    def scale(self) -> int:
        """The VAE's scale factor, 2 ** (blocks - 1), as the pipeline computes it."""
        return 2 ** (len(json.loads(self.decode)["block_out_channels"]) - 1)


_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def estimate_encode(model: ModelConfigs, dtype: str, device_type: str, strategy: str, batch_size: int, seq_len: int,
                    kept_texts: int = 0) -> Estimate:
    """`kept_texts`: the most embeddings the stage holds on the host between units (issue 21;
    memory.choose_strategies counts them from the job's texts)."""
    one = _encode_phases(model.encode, dtype, device_type, strategy, seq_len, 1)
    two = _encode_phases(model.encode, dtype, device_type, strategy, seq_len, 2)
    activations = max(a + (batch_size - 1) * (b - a) for a, b in zip(one, two))
    # Each kept text: prompt_embeds [1, seq, d_model] in the job's dtype, prompt_attention_mask [1, seq] int64.
    kept = kept_texts * seq_len * (json.loads(model.encode)["d_model"] * _DTYPE_BYTES[dtype] + 8)
    on_host = device_type == "cpu"
    return Estimate("encode", strategy, batch_size, _weights("text_encoder", model.encode, dtype, device_type, strategy),
                    activations + (kept if on_host else 0), _workspace("encode", device_type), host_kept_bytes=0 if on_host else kept)


def estimate_denoise(model: ModelConfigs, dtype: str, device_type: str, strategy: str, batch_size: int, shapes, seq_len: int,
                     plain: bool = False, chunk: int | None = None) -> Estimate:
    """`shapes`: the distinct (height, width, guidance on) the job denoises at; `plain`: the backend
    runs attention's plain path, on `chunk` queries at a time (None: all)."""
    activations = max(_denoise_activations(model.denoise, dtype, device_type, batch_size, cfg, h, w, model.scale, seq_len, plain, chunk)
                      for h, w, cfg in shapes)
    return Estimate("denoise", strategy, batch_size, _weights("transformer", model.denoise, dtype, device_type, strategy),
                    activations, _workspace("denoise", device_type), attention_chunk=chunk)


def estimate_decode(model: ModelConfigs, dtype: str, device_type: str, tile_size: int | None, shapes, plain: bool = False,
                    chunk: int | None = None) -> Estimate:
    """`shapes`: the distinct (height, width, requested (height, width) or None) the job decodes;
    `plain`: the backend runs attention's plain path (the VAE's mid-block attention), on `chunk`
    queries at a time (None: all)."""
    activations = max(_decode_activations(model.decode, dtype, device_type, h, w, requested, tile_size, plain, chunk)
                      for h, w, requested in shapes)
    return Estimate("decode", "full" if tile_size is None else "tiled", 1, _weights("vae", model.decode, dtype, device_type, "full"),
                    activations, _workspace("decode", device_type), tile_size, attention_chunk=chunk)


