"""Build PixArt-XL-2-1024-MS with random weights as a complete diffusers folder, offline and fast.

Reads:  orchestrator/reference_configs/PixArt-XL-2-1024-MS/ (the real configs; no weights exist here)
Writes: <out>/ with model_index.json, scheduler/, tokenizer/, text_encoder/ (T5EncoderModel, sharded
        safetensors + model.safetensors.index.json, key names as transformers saves them),
        transformer/ and vae/ (diffusers save_pretrained, safetensors), and BENCH_MODEL.json (how it
        was built). Our stages and `PixArtAlphaPipeline.from_pretrained` both load it.

Example: python bench/fullsize.py --out /tmp/pixart-random            # full size, fp16, ~11 GB
         python bench/fullsize.py --out /tmp/pixart-tiny --tiny-smoke  # same code, small configs

Speed: nothing is initialised twice. Every model is built on the meta device, and each weight is drawn
once with `normal_` on `--device` (the GPU when there is one: 5.4 B values in well under a second) and
written straight to its file. The T5 encoder (9.5 GB in fp16) is streamed tensor by tensor into its
shards, so it never sits in host memory whole.

Weight values: N(0, 1/fan_in) for matrices (T5 `q` and the embeddings as in transformers' T5 init), ones
for norm weights, zeros for biases, so activations stay finite in fp16. Images are noise, of course.

Known differences from the real repository (all irrelevant to memory and speed):
- dtype: the real T5 shards are float32 (19 GB). With `--dtype float16` (the default) every T5 weight
  is stored in fp16, the 24 feed-forward `wo` matrices too. Loading with `dtype=torch.float16` still
  keeps `wo` in fp32 (transformers' `_keep_in_fp32_modules`), so device memory after loading equals the
  real model's (11.5 GB); only the file is smaller and the `wo` values are fp16-representable.
- tokenizer: the real spiece.model is not available. The tokenizer is a T5Tokenizer over a synthetic
  32000-piece unigram vocabulary (prompt words, syllables, characters; see `synthetic_vocab`) plus the
  100 sentinels at 32000-32099 as in the real one, so prompts give real, varied ids below 32128. It is
  saved as transformers 5 saves it (tokenizer.json), not as spiece.model.
- sharding: 2 T5 shards by default (the real fp32 repo has 2: 9.99 + 9.06 GB, its fp16 variant 4.99 +
  4.53 GB); the index has the same form as transformers writes (`total_parameters`, `total_size`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shutil
import struct
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "orchestrator" / "reference_configs"
REFERENCE = CONFIGS / "PixArt-XL-2-1024-MS"
# Family members (--model): where each part's config comes from. Transformer-only repos are
# composed on their base as the job file composes them (README, "Supported models").
MODELS = {
    "alpha-1024": {part: "PixArt-XL-2-1024-MS" for part in ("index", "text_encoder", "transformer", "vae", "scheduler")},
    "alpha-512": {part: "PixArt-XL-2-512x512" for part in ("index", "text_encoder", "transformer", "vae", "scheduler")},
    "lcm-1024": {"index": "PixArt-LCM-XL-2-1024-MS", "text_encoder": "PixArt-XL-2-1024-MS", "transformer": "PixArt-XL-2-1024-MS",
                 "vae": "PixArt-XL-2-1024-MS", "scheduler": "PixArt-LCM-XL-2-1024-MS"},
    "sigma-1024": {part: "PixArt-Sigma-XL-2-1024-MS" for part in ("index", "text_encoder", "transformer", "vae", "scheduler")},
    "sigma-2k": {"index": "PixArt-Sigma-XL-2-1024-MS", "text_encoder": "PixArt-Sigma-XL-2-1024-MS", "transformer": "PixArt-Sigma-XL-2-2K-MS",
                 "vae": "pixart_sigma_sdxlvae_T5_diffusers", "scheduler": "pixart_sigma_sdxlvae_T5_diffusers"},
    "sigma-512": {"index": "PixArt-Sigma-XL-2-1024-MS", "text_encoder": "PixArt-Sigma-XL-2-1024-MS", "transformer": "PixArt-Sigma-XL-2-512-MS",
                  "vae": "pixart_sigma_sdxlvae_T5_diffusers", "scheduler": "pixart_sigma_sdxlvae_T5_diffusers"},
}
PARTS = ("tokenizer", "text_encoder", "transformer", "vae")
VOCAB_SIZE = 32000  # pieces in the real T5 spiece.model; the 100 sentinels follow (32000-32099)
EXTRA_IDS = 100

# Overrides of the real configs. Everything not named stays as in the reference configs (activation,
# norm types, sample_size 128 with its 1024 bins and micro-conditions, VAE factor 8, vocab 32128).
PRESETS = {
    "full": {"text_encoder": {}, "transformer": {}, "vae": {}},
    # `--tiny-smoke`: a few MB, for the CPU smoke test of bench/gpu.sh.
    "tiny": {
        "text_encoder": {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4},
        "transformer": {"num_layers": 2, "attention_head_dim": 12, "num_attention_heads": 2, "caption_channels": 32},
        "vae": {"block_out_channels": [8, 8, 16, 16], "layers_per_block": 1, "norm_num_groups": 4},
    },
}


# ---------------------------------------------------------------------------------------------
# Configs


def model_configs(preset: str = "full", overrides: dict | None = None, model: str = "alpha-1024") -> dict:
    """The reference configs of `model` with the preset's (and then the caller's) overrides applied."""
    sources = MODELS[model]
    configs = {part: json.loads((CONFIGS / sources[part] / part / "config.json").read_text(encoding="utf-8")) for part in ("text_encoder", "transformer", "vae")}
    for source in (PRESETS[preset], overrides or {}):
        for part, values in source.items():
            configs[part].update(values)
    t5, dit = configs["text_encoder"], configs["transformer"]
    # The rules that tie the three together (PIXART-NOTES.md, "Tiny-model rules").
    dit["caption_channels"] = t5["d_model"]
    dit["cross_attention_dim"] = dit["num_attention_heads"] * dit["attention_head_dim"]
    if dit["sample_size"] == 128 and dit.get("use_additional_conditions") is not False and dit["cross_attention_dim"] % 3:
        raise ValueError(f"transformer width {dit['cross_attention_dim']} must be divisible by 3 for the micro-conditions")
    return configs


# ---------------------------------------------------------------------------------------------
# Tokenizer

_WORDS = """a an the of in on at by with and or to from over under near into through for as is are
photo photograph painting portrait landscape illustration drawing sketch render art style digital oil
watercolor studio light lighting dramatic soft golden hour sunset sunrise night day morning evening sky
cloud clouds rain snow fog storm sea ocean beach river lake mountain mountains forest tree trees flower
flowers garden field desert city street road building house castle tower bridge village room library
kitchen table chair window door book cup apple fruit bread cake food cat dog horse bird owl fish dragon
robot astronaut knight wizard girl boy woman man child old young king queen ship boat car train plane
space moon sun star stars planet nebula galaxy cosmic fire water ice stone wood metal glass gold silver
red orange yellow green blue purple pink white black gray brown dark bright colorful small big large
giant tiny cute happy sad beautiful detailed highly realistic photorealistic cinematic epic fantasy
magic mystical ancient futuristic neon cyberpunk steampunk vintage retro minimalist abstract surreal
trapped riding reading sitting standing flying running walking wearing holding looking face eyes hair
hat dress cactus mushroom mushrooms lighthouse skyline pirate maelstrom sahara fisherman wooden cozy
high quality resolution 4k 8k hd sharp focus blurry low""".split()
_ONSETS = "- b c d f g h j k l m n p r s t v w y z bl br ch cl cr dr fl fr gl gr pl pr sh sk sl sm sn sp st str th tr wh".split()
_VOWELS = "a e i o u ai ea ee io oo ou y".split()
_CODAS = "- b ck d ft g l ll m n nd ng nt p r rd rs s ss st t th x".split()
_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"()-_/&#@%+*=<>[]{}|~$^`\\"


def synthetic_vocab(size: int = VOCAB_SIZE) -> list[tuple[str, float]]:
    """`size` unigram (piece, score) pairs: <pad>, </s>, <unk> (ids 0, 1, 2 as in T5), then words,
    syllables and two-syllable pieces (with and without the word-start mark '▁'), then single
    characters with the lowest scores, so any ASCII text segments without <unk>."""
    syllables = [(o if o != "-" else "") + v + (c if c != "-" else "") for o in _ONSETS for v in _VOWELS for c in _CODAS]
    chars = list(_CHARS) + ["▁" + c for c in _CHARS]
    room = size - 3 - len(chars)
    pieces: dict[str, None] = dict.fromkeys(chars)  # placed last; listed first only to skip repeats
    step = max(1, len(syllables) // 40)
    candidates = itertools.chain(
        ["▁" + w for w in _WORDS] + ["▁"],
        (p for s in syllables for p in ("▁" + s, s)),
        ("▁" + first + second for first in syllables for second in syllables[::step]),  # fills the rest, fixed order
    )
    for piece in candidates:
        if len(pieces) - len(chars) >= room:
            break
        pieces.setdefault(piece, None)
    ordered = list(pieces)[len(chars):]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(p, -4.0 - 8.0 * n / len(ordered)) for n, p in enumerate(ordered)]  # -4 .. -12
    vocab += [(c, -14.0) for c in chars]
    if len(vocab) != size or len({p for p, _ in vocab}) != size:
        raise RuntimeError(f"synthetic vocabulary has {len(vocab)} pieces ({len({p for p, _ in vocab})} distinct), not {size}")
    return vocab


def build_tokenizer():
    """A T5Tokenizer over the synthetic vocabulary; sentinels at 32099 (<extra_id_0>) .. 32000 as in T5."""
    from transformers import T5Tokenizer

    vocab = synthetic_vocab() + [(f"<extra_id_{i}>", 0.0) for i in range(EXTRA_IDS - 1, -1, -1)]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=EXTRA_IDS)
    check_tokenizer(tokenizer)
    return tokenizer


def save_tokenizer(folder: Path) -> dict:
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(folder)
    return {"pieces": len(tokenizer)}


def check_tokenizer(tokenizer, vocab_limit: int = 32128) -> list[int]:
    """Raise unless a prompt gives real ids (not all <unk>) below the T5 vocabulary size."""
    ids = tokenizer("A cute cat riding a horse on the moon, watercolor").input_ids
    if all(i == tokenizer.unk_token_id for i in ids[:-1]) or tokenizer.unk_token_id in ids:
        raise RuntimeError(f"synthetic tokenizer gives <unk> ids: {ids}")
    if max(ids) >= vocab_limit or len(tokenizer) > vocab_limit:
        raise RuntimeError(f"tokenizer ids reach {max(ids)} (size {len(tokenizer)}), beyond the T5 vocabulary {vocab_limit}")
    if tokenizer.convert_tokens_to_ids("<extra_id_0>") != VOCAB_SIZE + EXTRA_IDS - 1:  # cosmetic: prompts never use them
        print(f"warning: <extra_id_0> is at id {tokenizer.convert_tokens_to_ids('<extra_id_0>')}, not 32099 as in T5", file=sys.stderr)
    return ids


# ---------------------------------------------------------------------------------------------
# Random weights


def weight_std(name: str, shape: tuple, t5_config: dict | None = None) -> float | str:
    """How to fill one weight: a normal std, or 'ones' / 'zeros'."""
    if name.endswith("bias"):
        return "zeros"
    if len(shape) == 1:
        return "ones"  # RMSNorm / GroupNorm / LayerNorm weights
    if t5_config is not None:  # transformers' T5 init, factor 1.0
        if name == "shared.weight":
            return 1.0
        if name.endswith("SelfAttention.q.weight"):
            return (t5_config["d_model"] * t5_config["d_kv"]) ** -0.5
        if name.endswith("relative_attention_bias.weight"):
            return t5_config["d_model"] ** -0.5
    if name.endswith("scale_shift_table"):
        return shape[-1] ** -0.5  # as PixArt's randn / sqrt(dim)
    return math.prod(shape[1:]) ** -0.5  # 1 / sqrt(fan_in), also for conv kernels


def random_tensor(shape: tuple, std, dtype, device, generator):
    """A CPU tensor drawn on `device` (the GPU draws billions of values in milliseconds)."""
    import torch

    tensor = torch.empty(shape, dtype=dtype, device=device)
    if std == "zeros":
        tensor.zero_()
    elif std == "ones":
        tensor.fill_(1.0)
    else:
        tensor.normal_(0.0, std, generator=generator)
    return tensor.to("cpu")


_SAFETENSORS_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}


def write_safetensors(path: Path, entries: list[tuple[str, tuple]], dtype, make) -> int:
    """Write a safetensors file tensor by tensor: `make(name, shape)` returns each CPU tensor just
    before it is written, so at most one tensor is in memory. Returns the bytes of tensor data."""
    import torch

    code = _SAFETENSORS_DTYPES[str(dtype).replace("torch.", "")]
    header, offset = {}, 0
    for name, shape in entries:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name, shape in entries:
            tensor = make(name, shape)
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape) or not tensor.is_contiguous():
                raise RuntimeError(f"{name}: made {tensor.dtype} {tuple(tensor.shape)}, expected {dtype} {shape}")
            f.write(tensor.view(torch.uint8).numpy())  # raw little-endian bytes, no extra copy
    return offset


def text_encoder_entries(config: dict) -> tuple[list[tuple[str, tuple]], object]:
    """(name, shape) of every weight transformers saves for this T5EncoderModel, in its order,
    and the meta-device model. The tied embedding is saved once, as `shared.weight`."""
    import torch
    from transformers import T5Config, T5EncoderModel

    with torch.device("meta"):  # keeps the tie (accelerate's init_empty_weights breaks it)
        model = T5EncoderModel(T5Config(**config))
    if model.encoder.embed_tokens.weight is not model.shared.weight:
        model.tie_weights()
    if model.encoder.embed_tokens.weight is not model.shared.weight:
        raise RuntimeError("T5 encoder embedding is not tied to `shared`; the weights would count twice")
    entries = [(name, tuple(p.shape)) for name, p in model.named_parameters()]  # ties appear once
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    expected = [k for k in model.state_dict() if k not in tied]
    if [n for n, _ in entries] != expected:
        raise RuntimeError(f"T5 saved keys differ from transformers' state_dict minus tied keys: {set(expected) ^ {n for n, _ in entries}}")
    return entries, model


def save_text_encoder(folder: Path, config: dict, dtype, device, generator, shards: int) -> dict:
    """T5EncoderModel in the real checkpoint's layout: config.json, model-0000i-of-0000n.safetensors
    and model.safetensors.index.json, written by streaming (never whole in memory)."""
    entries, model = text_encoder_entries(config)
    folder.mkdir(parents=True)
    model.config.architectures = ["T5EncoderModel"]
    model.config.dtype = str(dtype).replace("torch.", "")
    model.config.save_pretrained(folder)
    sizes = [math.prod(shape) * dtype.itemsize for _, shape in entries]
    total = sum(sizes)
    groups: list[list[tuple[str, tuple]]] = [[]]
    filled = 0
    for entry, size in zip(entries, sizes):  # cut in parameter order, as transformers shards
        if groups[-1] and filled >= total * len(groups) / shards and len(groups) < shards:
            groups.append([])
        groups[-1].append(entry)
        filled += size
    make = lambda name, shape: random_tensor(shape, weight_std(name, shape, config), dtype, device, generator)  # noqa: E731
    weight_map = {}
    for n, group in enumerate(groups, 1):
        file = f"model-{n:05d}-of-{len(groups):05d}.safetensors"
        write_safetensors(folder / file, group, dtype, make)
        weight_map.update({name: file for name, _ in group})
    index = {
        "metadata": {"total_parameters": sum(math.prod(s) for _, s in entries), "total_size": total},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return {"parameters": index["metadata"]["total_parameters"], "bytes": total, "files": len(groups)}


def save_diffusers_model(cls, folder: Path, config: dict, dtype, device, generator) -> dict:
    """Build on meta (buffers stay real), draw each weight once, then `save_pretrained`."""
    import torch
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = cls.from_config(config)
    count = 0
    for name, param in list(model.named_parameters()):
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        module._parameters[leaf] = torch.nn.Parameter(
            random_tensor(tuple(param.shape), weight_std(name, tuple(param.shape)), dtype, device, generator), requires_grad=False
        )
        count += param.numel()
    model.save_pretrained(folder, safe_serialization=True)
    return {"parameters": count, "bytes": count * dtype.itemsize}


# ---------------------------------------------------------------------------------------------
# The folder


def build_model(out: Path, preset: str = "full", dtype_name: str = "float16", device: str | None = None, seed: int = 0,
                overrides: dict | None = None, shards: int = 2, log=print, model: str = "alpha-1024", parts=PARTS) -> dict:
    """Write the folder to `out` (built beside it, then renamed into place); return its report.
    `parts` leaves out components another folder provides (a job composes them: [job.components])."""
    import torch
    from diffusers import AutoencoderKL, PixArtTransformer2DModel

    out = Path(out)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype_name]
    configs = model_configs(preset, overrides, model)
    sources = MODELS[model]
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    generator = torch.Generator(device).manual_seed(seed)
    started = time.perf_counter()
    report = {"built_by": "bench/fullsize.py", "model": model, "parts": list(parts), "preset": preset, "dtype": dtype_name, "seed": seed,
              "device": device, "overrides": overrides or {}, "components": {}, "seconds": {}}

    def timed(part, make):
        clock = time.perf_counter()
        report["components"][part] = make()
        report["seconds"][part] = round(time.perf_counter() - clock, 2)
        info = report["components"][part]
        log(f"  {part}: {info.get('parameters', 0) / 1e6:.1f} M params, {info.get('bytes', 0) / 1e9:.2f} GB, {report['seconds'][part]:.1f} s")

    shutil.copyfile(CONFIGS / sources["index"] / "model_index.json", partial / "model_index.json")
    (partial / "scheduler").mkdir()
    shutil.copyfile(CONFIGS / sources["scheduler"] / "scheduler" / "scheduler_config.json", partial / "scheduler" / "scheduler_config.json")
    if "tokenizer" in parts:
        timed("tokenizer", lambda: save_tokenizer(partial / "tokenizer"))
    if "text_encoder" in parts:
        timed("text_encoder", lambda: save_text_encoder(partial / "text_encoder", configs["text_encoder"], dtype, device, generator, shards))
    if "transformer" in parts:
        timed("transformer", lambda: save_diffusers_model(PixArtTransformer2DModel, partial / "transformer", configs["transformer"], dtype, device, generator))
    if "vae" in parts:
        timed("vae", lambda: save_diffusers_model(AutoencoderKL, partial / "vae", configs["vae"], dtype, device, generator))
    report["configs"] = configs
    report["seconds"]["total"] = round(time.perf_counter() - started, 2)
    report["bytes"] = sum(c.get("bytes", 0) for c in report["components"].values())
    if "text_encoder" in parts and "tokenizer" in parts:
        verify_model(partial, configs)
    (partial / "BENCH_MODEL.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return report


def verify_model(folder: Path, configs: dict) -> None:
    """Cheap checks without loading weights: every T5 key and shape transformers expects is in the
    shards the index names, and the saved tokenizer gives real ids inside the T5 vocabulary."""
    from safetensors import safe_open
    from transformers import T5Tokenizer

    entries, _ = text_encoder_entries(configs["text_encoder"])
    index = json.loads((folder / "text_encoder" / "model.safetensors.index.json").read_text(encoding="utf-8"))
    found = {}
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(str(folder / "text_encoder" / file), "pt") as f:
            for key in f.keys():
                found[key] = (tuple(f.get_slice(key).get_shape()), file)
    expected = {name: shape for name, shape in entries}
    if {k: v[0] for k, v in found.items()} != expected or any(index["weight_map"][k] != v[1] for k, v in found.items()):
        raise RuntimeError(f"text_encoder shards do not match the expected keys: {sorted(set(found) ^ set(expected))[:5]}")
    check_tokenizer(T5Tokenizer.from_pretrained(folder / "tokenizer"), configs["text_encoder"]["vocab_size"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build PixArt-XL-2-1024-MS with random weights as a diffusers folder.")
    parser.add_argument("--out", type=Path, default=Path("/tmp/pixart-xl-2-1024-ms-random"), help="the folder to write")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16",
                        help="stored weight dtype (float16: T5 `wo` stored fp16 too, see the module docstring)")
    parser.add_argument("--device", default=None, help="where weights are drawn: cuda (default when available) or cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny-smoke", action="store_true", help="small configs, same code path (for the CPU smoke test)")
    parser.add_argument("--force", action="store_true", help="rebuild even if <out> already holds this model")
    parser.add_argument("--model", choices=sorted(MODELS), default="alpha-1024", help="the family member (default alpha-1024)")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help="components to build, comma-separated (default all); leave out what a job takes from another folder")
    args = parser.parse_args(argv)
    preset = "tiny" if args.tiny_smoke else "full"
    parts = tuple(p for p in args.parts.split(",") if p)
    if not set(parts) <= set(PARTS) or not parts:
        parser.error(f"--parts: choose from {', '.join(PARTS)}")
    built = args.out / "BENCH_MODEL.json"
    if built.exists() and not args.force:
        previous = json.loads(built.read_text(encoding="utf-8"))
        if ((previous.get("preset"), previous.get("dtype"), previous.get("seed"), previous.get("overrides"), previous.get("model", "alpha-1024"),
             tuple(previous.get("parts", PARTS))) == (preset, args.dtype, args.seed, {}, args.model, parts)):
            print(f"{args.out}: already built ({args.model}, {preset}, {args.dtype}, seed {args.seed}); --force rebuilds")
            return 0
    print(f"building {preset} {args.model} ({', '.join(parts)}) with random {args.dtype} weights in {args.out}")
    report = build_model(args.out, preset, args.dtype, args.device, args.seed, model=args.model, parts=parts)
    print(f"done: {report['bytes'] / 1e9:.2f} GB of weights in {report['seconds']['total']:.1f} s (drawn on {report['device']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
