"""The PixArt family a job runs as: the diffusers pipeline the stages mirror, line for line.

`PixArtAlphaPipeline` and `PixArtSigmaPipeline` (diffusers 0.42.1,
pipelines/pixart_alpha/pipeline_pixart_{alpha,sigma}.py) share `encode_prompt` and the denoising
loop; their `__call__` differ only in what `Family` holds:

| | α | Σ |
|---|---|---|
| `max_sequence_length` default | 120 | 300 |
| aspect-ratio bins by transformer `sample_size` | 128/64/32 -> 1024/512/256 | also 256 -> 2048 |
| micro-conditions (resolution, aspect ratio) | when `sample_size` == 128 | never |
| `scheduler.set_begin_index(0)` before the loop | yes | no |
| the 1-step rule: `scheduler.step(...)[i]` when `num_inference_steps == 1` | `[1]` | `[0]` |
| latents cast to the VAE's dtype before `vae.decode` | no | yes |

How the family of a model is decided (`detect`): the job's `pipeline` key when given; else the
transformer config when it names Σ outright (`use_additional_conditions: false`, or
`sample_size: 256`, which α never has); else `model_index.json`'s `_class_name`; else, for a
model_index naming α, a VAE that is SDXL's (`scaling_factor` 0.13025), which only Σ uses: the Σ base
repo `PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers` names PixArtAlphaPipeline in its
model_index (a trap); else α.
"""

from __future__ import annotations

from dataclasses import dataclass

ALPHA, SIGMA = "PixArtAlphaPipeline", "PixArtSigmaPipeline"
SDXL_VAE_SCALING_FACTOR = 0.13025


@dataclass(frozen=True)
class Family:
    pipeline: str
    name: str  # for people: "PixArt-α"
    max_sequence_length: int
    bins: dict  # transformer sample_size -> the name of diffusers' ASPECT_RATIO_<n>_BIN table
    micro_conditions_at: int | None  # the sample_size with resolution/aspect-ratio conditions
    set_begin_index: bool
    one_step_index: int  # which element of scheduler.step's tuple a 1-step run takes
    cast_latents_to_vae_dtype: bool


FAMILIES = {
    ALPHA: Family(ALPHA, "PixArt-α", 120, {128: "1024", 64: "512", 32: "256"}, 128, True, 1, False),
    SIGMA: Family(SIGMA, "PixArt-Σ", 300, {256: "2048", 128: "1024", 64: "512", 32: "256"}, None, False, 0, True),
}


def of(pipeline: str | None) -> Family:
    """The Family of a resolved job's `pipeline` (absent in jobs resolved before families: α)."""
    return FAMILIES[pipeline or ALPHA]


def detect(given: str | None, model_index: dict, transformer_config: dict, vae_config: dict) -> tuple[str, str]:
    """(pipeline class name, why) for a model; see the module docstring. `given` is the job's
    `pipeline` key, already checked to be one of FAMILIES."""
    if given:
        return given, "the job's 'pipeline' key"
    if transformer_config.get("use_additional_conditions") is False:
        return SIGMA, "the transformer config (use_additional_conditions: false)"
    if transformer_config.get("sample_size") == 256:
        return SIGMA, "the transformer config (sample_size 256: the 2K model)"
    named = model_index.get("_class_name")
    if named == SIGMA:
        return SIGMA, "model_index.json"
    if vae_config.get("scaling_factor") == SDXL_VAE_SCALING_FACTOR:
        return SIGMA, f"the SDXL VAE (scaling_factor {SDXL_VAE_SCALING_FACTOR}), which only PixArt-Σ uses" + (
            f"; model_index.json names {named}" if named else "")
    if named == ALPHA:
        return ALPHA, "model_index.json"
    return ALPHA, "the default (no model_index.json class, no Σ transformer or VAE)"


def bin_table(pipeline: str | None, sample_size: int) -> dict | None:
    """The pipeline's aspect-ratio table for this sample_size, or None when it has none (the
    pipeline raises 'Invalid sample size' there)."""
    name = of(pipeline).bins.get(sample_size)
    if name is None:
        return None
    if name == "2048":
        from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN as table
    else:
        from diffusers.pipelines.pixart_alpha import pipeline_pixart_alpha

        table = getattr(pipeline_pixart_alpha, f"ASPECT_RATIO_{name}_BIN")
    return table


def binned_size(pipeline: str | None, sample_size: int, height: int, width: int) -> tuple[int, int]:
    """The aspect-ratio bin the pipeline maps (height, width) to (pipeline step 1)."""
    from diffusers.image_processor import PixArtImageProcessor

    table = bin_table(pipeline, sample_size)
    if table is None:
        sizes = ", ".join(str(s) for s in sorted(of(pipeline).bins))
        raise ValueError(f"resolution binning in {of(pipeline).name} needs a transformer sample_size of {sizes}, not {sample_size}")
    return PixArtImageProcessor.classify_height_width_bin(height, width, ratios=table)
