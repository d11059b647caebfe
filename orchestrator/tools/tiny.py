"""Build a tiny PixArt-alpha diffusers folder with random weights, offline.

Used by `orchestrate demo` (a first run on a machine with no real weights: `write_demo_job`) and by
the tests. The architecture follows diffusers' `get_dummy_components` for PixArt: a 2-layer
transformer with sample_size 128 (so the 1024 aspect-ratio bins and the micro-conditions are
exercised), a narrow 4-block VAE (scale factor 8, as in the real one), a 2-layer T5 and a
SentencePiece tokenizer trained here on a few sentences. The scheduler config is the real
PixArt-XL-2-1024-MS one.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from stages.contract import JobFileError
from stages.files import shown_path

REFERENCE_CONFIGS = Path(__file__).parent.parent / "reference_configs"

_SENTENCES = [
    "pirate ship trapped in a cosmic maelstrom nebula",
    "a small cactus with a happy face in the sahara desert",
    "an astronaut riding a green horse on the moon",
    "a cute cat riding a horse at sunset",
    "a watercolor painting of a lighthouse by the sea",
    "portrait of an old fisherman, oil painting, dramatic light",
    "a red apple on a wooden table, studio photo",
    "city skyline at night with neon lights and rain",
    "a forest of giant mushrooms under a purple sky",
    "an owl reading a book in a cozy library",
]


def _train_tokenizer_vocab(vocab_size: int = 80) -> list[tuple[str, float]]:
    """Train a SentencePiece unigram model in memory and return its (piece, score) list."""
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_SENTENCES * 20),
        model_writer=buffer,
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        minloglevel=2,
    )
    processor = spm.SentencePieceProcessor(model_proto=buffer.getvalue())
    return [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]


def build_tiny_tokenizer():
    """A T5Tokenizer over a freshly trained vocabulary (transformers 5 ignores a bare vocab_file)."""
    from transformers import T5Tokenizer

    tokenizer = T5Tokenizer(vocab=_train_tokenizer_vocab(), extra_ids=100)
    ids = tokenizer("a cute cat riding a horse").input_ids
    if all(i == tokenizer.unk_token_id for i in ids[:-1]):  # the transformers 5 trap, see PIXART-NOTES.md
        raise RuntimeError(f"tiny tokenizer maps every word to <unk>: {ids}")
    return tokenizer


# Widths and depths: "tiny" runs a 1024x1024 image in about a second on a CPU; "medium" has weights
# large enough (T5 ~130 MB, transformer ~60 MB in fp32) to test memory budgets and estimates.
SIZES = {
    "tiny": {"t5_dim": 32, "t5_kv": 8, "t5_ff": 64, "t5_layers": 2, "t5_heads": 4, "layers": 2, "heads": 2, "head_dim": 12},
    "medium": {"t5_dim": 512, "t5_kv": 64, "t5_ff": 2048, "t5_layers": 8, "t5_heads": 8, "layers": 8, "heads": 6, "head_dim": 64},
}


# PixArt-Σ's transformers: no micro-conditions, and the interpolation scale of the real configs
# (orchestrator/reference_configs/PixArt-Sigma-*/transformer/config.json) for each sample_size.
SIGMA_INTERPOLATION = {32: 0.5, 64: 1, 128: 2, 256: 4}


def build_tiny_components(seed: int = 0, size: str = "tiny", family: str = "alpha", sample_size: int = 128) -> dict:
    """Random-weight tokenizer, T5 encoder, transformer, VAE and the real scheduler. `family`
    "sigma" makes a PixArt-Σ twin: a transformer with `use_additional_conditions` false and Σ's
    interpolation scale, and an SDXL-style VAE (scaling_factor 0.13025), as the Σ repos have."""
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    dims = SIZES[size]
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=dims["t5_dim"],
            d_kv=dims["t5_kv"],
            d_ff=dims["t5_ff"],
            num_layers=dims["t5_layers"],
            num_heads=dims["t5_heads"],
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            dense_act_fn="gelu_new",
            is_gated_act=True,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    sigma = {"use_additional_conditions": False, "interpolation_scale": SIGMA_INTERPOLATION[sample_size]} if family == "sigma" else {}
    transformer = PixArtTransformer2DModel(
        **sigma,
        sample_size=sample_size,  # α: 128 selects the 1024 bins and enables the micro-conditions
        num_layers=dims["layers"],
        patch_size=2,
        attention_head_dim=dims["head_dim"],
        num_attention_heads=dims["heads"],  # heads x head_dim divisible by 3 for the micro-conditions
        caption_channels=dims["t5_dim"],  # = T5 d_model
        in_channels=4,
        cross_attention_dim=dims["heads"] * dims["head_dim"],
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 8, 16, 16),  # 4 blocks: scale factor 8, as the real VAE
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=256,
        scaling_factor=0.13025 if family == "sigma" else 0.18215,  # SDXL's VAE (Σ) or sd-vae-ft-ema (α)
    )
    scheduler = DPMSolverMultistepScheduler.from_pretrained(
        REFERENCE_CONFIGS / "PixArt-XL-2-1024-MS" / "scheduler"
    )
    return {
        "tokenizer": tokenizer,
        "text_encoder": text_encoder.eval(),
        "transformer": transformer.eval(),
        "vae": vae.eval(),
        "scheduler": scheduler,
    }


def save_tiny_model(path: Path, seed: int = 0, size: str = "tiny", family: str = "alpha", sample_size: int = 128) -> Path:
    """Write a complete small diffusers folder (safetensors weights) to `path` and return it; its
    model_index.json names the family's pipeline (PixArtAlphaPipeline or PixArtSigmaPipeline)."""
    import diffusers

    path = Path(path)
    pipeline_class = diffusers.PixArtSigmaPipeline if family == "sigma" else diffusers.PixArtAlphaPipeline
    pipe = pipeline_class(**build_tiny_components(seed, size, family, sample_size))
    pipe.save_pretrained(path, safe_serialization=True)
    (path / "TINY_MODEL.json").write_text(json.dumps({"built_by": "orchestrator.tools.tiny", "seed": seed, "size": size, "family": family,
                                                      "sample_size": sample_size}) + "\n", encoding="utf-8")
    return path


# The job `orchestrate demo` writes next to the tiny model and runs.
DEMO_JOB = """\
# Written by `orchestrate demo`: a small queue on the tiny random-weight model.
[job]
name = "demo"
model = "demo-model"   # relative to this file

[defaults]
num_inference_steps = 8
width = 256
height = 256
use_resolution_binning = false

[[generation]]
prompt = "pirate ship trapped in a cosmic maelstrom nebula"
seed = 1152753
count = 2

[[generation]]
prompt = "a small cactus with a happy face in the sahara desert"
negative_prompt = "blurry"
seed = 7
width = 384
height = 256
guidance_scale = 5.0
"""


def write_demo_job(workdir: Path, family: str, echo) -> Path:
    """`orchestrate demo`'s job file in `workdir`, beside its tiny model (built once per family)."""
    if family not in ("alpha", "sigma"):
        raise JobFileError(f"--family {family!r} is not alpha or sigma")
    workdir.mkdir(parents=True, exist_ok=True)
    suffix = "" if family == "alpha" else f"-{family}"
    model = workdir / f"demo-model{suffix}"
    if not (model / "model_index.json").exists():
        echo(f"building a tiny random-weight PixArt-{'α' if family == 'alpha' else 'Σ'} model in {shown_path(model)}")
        save_tiny_model(model, family=family)
    job_file = workdir / f"demo{suffix}.toml"
    job_file.write_text(DEMO_JOB.replace('name = "demo"', f'name = "demo{suffix}"').replace('model = "demo-model"', f'model = "demo-model{suffix}"'), encoding="utf-8")
    echo(f"job file: {shown_path(job_file)}")
    return job_file
