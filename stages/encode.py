"""Encode stage: prompts -> T5 embeddings.

Reads:  <job_dir>/job.resolved.json
Writes: <job_dir>/encode/<key>.safetensors (`prompt_embeds` [1, seq, dim], `prompt_attention_mask`
        [1, seq], plus the `negative_*` pair when the item uses guidance) and <key>.json, its record.
Loads:  the tokenizer and T5EncoderModel only (never the transformer or VAE weights).

Example: python -m stages.encode workdir/beach

Each unique text is encoded once per process, with batch size 1 and through the pipeline's own
`encode_prompt`, so the embeddings equal what `PixArtAlphaPipeline.__call__` computes bit for bit.
"""

from __future__ import annotations

import sys
from pathlib import Path

from stages import contract


def load_text_encoder(job: dict, device):
    """The tokenizer and T5 encoder, wrapped in a pipeline object that has no other components."""
    import torch
    from diffusers import PixArtAlphaPipeline
    from transformers import T5EncoderModel, T5Tokenizer

    path = job["model"]["path"]
    with contract.loading("encode", path, "tokenizer"):
        tokenizer = T5Tokenizer.from_pretrained(path, subfolder="tokenizer")
    # from_pretrained (not .to(fp16) afterwards) keeps T5's `wo` in fp32: see PIXART-NOTES.md.
    with contract.loading("encode", path, "text_encoder"):
        text_encoder = T5EncoderModel.from_pretrained(
            path, subfolder="text_encoder", dtype=contract.torch_dtype(job["dtype"]), use_safetensors=True
        ).to(device).eval()
    if all(i == tokenizer.unk_token_id for i in tokenizer("a photo of a cat").input_ids[:-1]):
        raise contract.ArtifactError(f"encode: the tokenizer in {path}/tokenizer maps every word to <unk>; its vocabulary is broken")
    pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=None, transformer=None, scheduler=None)
    torch.set_grad_enabled(False)  # the pipeline's __call__ runs encode_prompt under no_grad
    return pipe


def encode_text(pipe, text: str, job: dict, device) -> tuple:
    """(embeds [1, seq, dim], mask [1, seq]) for one text, exactly as the pipeline computes it."""
    embeds, mask, _, _ = pipe.encode_prompt(
        text,
        do_classifier_free_guidance=False,
        device=device,
        clean_caption=job["clean_caption"],
        max_sequence_length=job["max_sequence_length"],
    )
    return embeds, mask


def make_units(job: dict, job_dir: Path, todo: list, log) -> dict:
    import torch
    from safetensors.torch import save_file

    device = torch.device(job["device"])
    clock = contract.Clock()
    contract.reset_peak_memory(device)
    # 1. Load the tokenizer and the text encoder.
    pipe = load_text_encoder(job, device)
    load_seconds = clock.seconds()
    cache: dict[str, tuple] = {}  # text -> (embeds, mask); a text shared by many items is encoded once
    for n, unit in enumerate(todo, 1):
        started = contract.Clock()
        # 2. Encode the prompt and, with guidance, the negative prompt (pipeline step 3).
        tensors = {}
        for prefix, text in (("", unit.params["prompt"]), ("negative_", unit.params["negative_prompt"])):
            if text is None:
                continue
            if text not in cache:
                cache[text] = encode_text(pipe, text, job, device)
            embeds, mask = cache[text]
            tensors[f"{prefix}prompt_embeds"] = embeds.detach().to("cpu").contiguous().clone()  # [1, seq, dim]; own storage
            tensors[f"{prefix}prompt_attention_mask"] = mask.to("cpu").contiguous().clone()  # [1, seq]
        # 3. Publish the artifact, then its record.
        out = job_dir / "encode" / f"{unit.key}.safetensors"
        contract.publish(out, lambda tmp: save_file(tensors, str(tmp), metadata=contract.safetensors_metadata("encode", unit.key)))
        contract.write_record(unit.record_path(job_dir), {
            "stage": "encode",
            "key": unit.key,
            "items": list(unit.items),
            "params": unit.params,
            "inputs": {},
            "outputs": {out.name: contract.output_entry(out)},
            "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in tensors.items()},
            "model": {"given": job["model"]["given"], "path": job["model"]["path"], "config_hash": job["model"]["component_hashes"]["encode"]},
            "versions": contract.versions(),
            "device": str(device),
            "dtype": job["dtype"],
            "seconds": started.seconds(),
            "peak": contract.peak_memory(device),
        })
        log.info("encode: %d/%d %s (%d items) %.2f s", n, len(todo), unit.key, len(unit.items), started.seconds())
    return {"load_seconds": load_seconds, "peak": contract.peak_memory(device)}


def main(argv: list[str] | None = None) -> int:
    return contract.stage_main("encode", make_units, argv)


if __name__ == "__main__":
    sys.exit(main())
