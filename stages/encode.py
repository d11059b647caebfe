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

from stages import artifacts, contract, entry, family, files, measure, records, resolved, store
from stages.embedding_cache import EmbeddingCache


def load_text_encoder(job: dict, device):
    """The tokenizer and T5 encoder, wrapped in a pipeline object that has no other components."""
    import diffusers
    import torch
    from transformers import T5EncoderModel, T5Tokenizer

    tokenizer_root = resolved.component_root(job, "tokenizer")
    with entry.loading("encode", tokenizer_root, "tokenizer"):
        tokenizer = T5Tokenizer.from_pretrained(tokenizer_root, subfolder="tokenizer")
    path = resolved.component_root(job, "text_encoder")
    # from_pretrained (not .to(fp16) afterwards) keeps T5's `wo` in fp32: see PIXART-NOTES.md.
    # On a GPU the weights go straight from the safetensors files to the device (device_map), so
    # host memory never holds the whole T5 (~9.5 GB in fp16) on the way.
    placement = {"device_map": str(device)} if device.type == "cuda" else {}
    with entry.loading("encode", path, "text_encoder"):
        from transformers import T5Config

        from stages.weights import check_complete

        check_complete(T5EncoderModel, Path(path) / "text_encoder", T5Config.from_pretrained(Path(path) / "text_encoder"))
        text_encoder = T5EncoderModel.from_pretrained(
            path, subfolder="text_encoder", dtype=resolved.torch_dtype(job["dtype"]), use_safetensors=True, **placement
        ).to(device).eval()
    if all(i == tokenizer.unk_token_id for i in tokenizer("a photo of a cat").input_ids[:-1]):
        raise contract.ArtifactError(f"encode: the tokenizer in {tokenizer_root}/tokenizer maps every word to <unk>; its vocabulary is broken")
    # The family's own pipeline class (stages/family.py): its encode_prompt is what the pipeline runs.
    pipeline_class = getattr(diffusers, family.of(job.get("pipeline")).pipeline)
    pipe = pipeline_class(tokenizer=tokenizer, text_encoder=text_encoder, vae=None, transformer=None, scheduler=None)
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


def stream_encode(job: dict, device, texts: list[str], loader_state: dict) -> dict:
    """T5 layer-major over a batch of texts: one block at a time is read from the safetensors files
    and moved to the device, and every text passes through it (batch 1 each, so the math equals the
    resident path bit for bit) before the next block replaces it. The embedding lookup runs on the
    host. Returns {text: (embeds [1, seq, dim], mask [1, seq])}."""
    import torch
    from transformers import T5Config, T5EncoderModel, T5Tokenizer
    from transformers.masking_utils import create_bidirectional_mask

    from stages.weights import BlockLoader, WeightIndex, dtype_rule, require_complete

    path = resolved.component_root(job, "text_encoder")
    dtype = resolved.torch_dtype(job["dtype"])
    if "loader" not in loader_state:  # built once per process, reused for every batch
        tokenizer_root = resolved.component_root(job, "tokenizer")
        with entry.loading("encode", str(tokenizer_root), "tokenizer"):
            tokenizer = T5Tokenizer.from_pretrained(tokenizer_root, subfolder="tokenizer")
        with entry.loading("encode", str(path), "text_encoder"):
            config = T5Config.from_pretrained(path / "text_encoder")
            index = WeightIndex(path / "text_encoder")
            with torch.device("meta"):  # not accelerate's init_empty_weights: it unties T5's embedding
                model = T5EncoderModel(config).eval()
            require_complete(model, path / "text_encoder")
        cast = dtype_rule(dtype, T5EncoderModel._keep_in_fp32_modules)
        embedding_key = "shared.weight" if "shared.weight" in index.files else "encoder.embed_tokens.weight"
        embedding = index.read(embedding_key, cast)[""]  # [vocab, dim], stays on the host
        from diffusers import PixArtAlphaPipeline

        captions = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=None, vae=None, transformer=None, scheduler=None)
        loader_state.update(loader=BlockLoader(index, cast, device), model=model, embedding=embedding, captions=captions, tokenizer=tokenizer)
    loader, encoder = loader_state["loader"], loader_state["model"].encoder
    tokenizer, captions, embedding = loader_state["tokenizer"], loader_state["captions"], loader_state["embedding"]
    torch.set_grad_enabled(False)
    # Tokenize exactly as PixArtAlphaPipeline.encode_prompt does.
    hidden, masks, attention, bias = [], [], [], []
    for text in texts:
        cleaned = captions._text_preprocessing(text, clean_caption=job["clean_caption"])
        inputs = tokenizer(cleaned, padding="max_length", max_length=job["max_sequence_length"], truncation=True,
                           add_special_tokens=True, return_tensors="pt")
        h = torch.nn.functional.embedding(inputs.input_ids, embedding).to(device)  # [1, seq, dim]
        masks.append(inputs.attention_mask)  # [1, seq]
        # Positional: the second argument is `input_embeds` in transformers 5.0, `inputs_embeds` later.
        attention.append(create_bidirectional_mask(encoder.config, h, inputs.attention_mask.to(device)))
        hidden.append(h)
        bias.append(None)  # relative position bias, made by block 0 and shared by the others
    blocks = list(encoder.block)
    for i, block in enumerate(blocks):
        if i + 1 < len(blocks):
            loader.prefetch(f"encoder.block.{i + 1}.")
        nbytes = loader.materialise(block, f"encoder.block.{i}.")
        for t in range(len(texts)):
            hidden[t], bias[t], _ = block(hidden[t], attention[t], bias[t], None, None, None, cache=None)
        loader.release(block, nbytes)
    nbytes = loader.materialise(encoder.final_layer_norm, "encoder.final_layer_norm.")
    # Embeddings go to the host at once: device memory holds one batch, however long the queue.
    out = {text: (encoder.final_layer_norm(h).to(dtype).to("cpu"), m) for text, h, m in zip(texts, hidden, masks)}
    loader.release(encoder.final_layer_norm, nbytes)
    loader_state["passes"] = loader_state.get("passes", 0) + 1
    return out


def _texts(unit) -> list[str]:
    return [t for t in (unit.params["prompt"], unit.params["negative_prompt"]) if t is not None]


def make_units(job: dict, job_dir: Path, todo: list, log) -> dict:
    import torch
    from diffusers import PixArtAlphaPipeline  # noqa: F401  imported before the memory baseline
    from transformers import T5EncoderModel, T5Tokenizer  # noqa: F401
    from safetensors.torch import save_file

    device = entry.open_device(job)
    plan = job.get("runtime", {}).get("stages", {}).get("encode", {})
    strategy, batch_size = plan.get("strategy", "resident"), max(1, plan.get("batch_size") or 1)
    clock = measure.Clock()
    host_rss_at_start = measure.reset_peak_memory(device)
    # 0. The embedding store (stages/store.py): units other jobs already encoded are taken, not made;
    # a forced run (--force encode, `orchestrate stage encode`) makes every unit itself.
    store_dir = job.get("embedding_store")
    taken = []
    if store_dir and not job.get("forced"):
        context = records.record_context(job, "encode", device)
        width = artifacts.embedding_width(job)
        for unit in todo:
            started = measure.Clock()
            expected = artifacts.embeddings_expected(unit.params, job["dtype"], width) if width else None
            stored = store.take(Path(store_dir), job_dir, unit, log, expected)
            if stored is None:
                continue
            out = job_dir / "encode" / f"{unit.key}.safetensors"
            records.write_record(unit.record_path(job_dir), {
                "stage": "encode", "key": unit.key, "items": list(unit.items), "params": unit.params, "inputs": {},
                "outputs": {out.name: records.output_entry(out)}, "tensors": stored["tensors"],
                "strategy": {"strategy": "store", "batch_size": 1}, "from_store": True, **context,
                "seconds": started.seconds(), "peak": measure.peak_memory(device),
            })
            taken.append(unit)
        if taken:
            log.info("encode: %d of %d artifacts taken from the embedding store %s", len(taken), len(todo), store_dir)
        todo = [unit for unit in todo if unit not in taken]
        if not todo:
            log.info("encode: every artifact came from the embedding store; T5 was not loaded")
            return {"load_seconds": 0.0, "peak": measure.peak_memory(device), "host_rss_at_start_bytes": host_rss_at_start,
                    "strategy": "store", "batch_size": 1, "from_store": len(taken), "weight_passes": 0}
    # 1. Load the tokenizer and the text encoder (streamed: only its skeleton, on meta).
    with entry.oom_guard(job, *todo):  # loading can run out of memory too
        pipe, stream_state = (load_text_encoder(job, device), None) if strategy == "resident" else (None, {})
    load_seconds = clock.seconds()
    context = records.record_context(job, "encode", device)
    # text -> (embeds, mask), each kept only while a later unit needs it: a text shared by many
    # items is encoded once, and the queue's length does not grow the process.
    cache = EmbeddingCache([_texts(unit) for unit in todo])
    log.info("encode: %d texts for %d artifacts, strategy %s%s", len(cache.order), len(todo), strategy,
             f", {batch_size} texts per pass over the weights" if strategy == "stream" else "")
    progress = entry.Progress("encode", len(todo), log)
    for n, unit in enumerate(todo, 1):
        started = measure.Clock()
        # 2. Encode the prompt and, with guidance, the negative prompt (pipeline step 3).
        missing = cache.missing(_texts(unit))
        with entry.oom_guard(job, unit):
            if missing and strategy == "stream":
                for text, value in stream_encode(job, device, cache.batch(missing, batch_size), stream_state).items():
                    cache.put(text, value)
            for text in missing:
                if text not in cache.held:
                    embeds, mask = encode_text(pipe, text, job, device)
                    cache.put(text, (embeds.to("cpu"), mask.to("cpu")))  # on the host: device memory stays flat
        tensors = {}
        for prefix, text in (("", unit.params["prompt"]), ("negative_", unit.params["negative_prompt"])):
            if text is None:
                continue
            embeds, mask = cache.held[text]
            tensors[f"{prefix}prompt_embeds"] = embeds.detach().to("cpu").contiguous().clone()  # [1, seq, dim]; own storage
            tensors[f"{prefix}prompt_attention_mask"] = mask.to("cpu").contiguous().clone()  # [1, seq]
        # 3. Publish the artifact, then its record.
        described = {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in tensors.items()}
        out = job_dir / "encode" / f"{unit.key}.safetensors"
        files.publish(out, lambda tmp: save_file(tensors, str(tmp), metadata=files.safetensors_metadata("encode", unit.key)))
        records.write_record(unit.record_path(job_dir), {
            "stage": "encode",
            "key": unit.key,
            "items": list(unit.items),
            "params": unit.params,
            "inputs": {},
            "outputs": {out.name: records.output_entry(out)},
            "tensors": described,
            "strategy": {"strategy": strategy, "batch_size": batch_size},
            "from_store": False,
            **context,
            "seconds": started.seconds(),
            "peak": measure.peak_memory(device),
        })
        if store_dir:  # after the job's own record: the store never holds what the job has not accepted
            store.put(Path(store_dir), job_dir, unit, described, log)
        cache.done(_texts(unit))
        del tensors
        progress.item(1, "encode: %d/%d %s (%d items) %.2f s", n, len(todo), unit.key, len(unit.items), started.seconds())
    progress.close()
    summary = {"load_seconds": load_seconds, "peak": measure.peak_memory(device), "host_rss_at_start_bytes": host_rss_at_start, "strategy": strategy,
               "batch_size": batch_size, "from_store": len(taken), "embeddings_held_max": cache.most}
    if pipe is not None:
        summary.update(weight_passes=1, weight_bytes_moved=sum(p.numel() * p.element_size() for p in pipe.text_encoder.parameters()))
    if stream_state:
        loader = stream_state["loader"]
        loader.close()
        summary.update(weight_passes=stream_state.get("passes", 0), weight_bytes_moved=loader.bytes_moved,
                       peak_resident_weight_bytes=loader.peak_resident)
        log.info("encode: %d pass(es) over the T5 weights, %s moved, at most %s of weights resident",
                 summary["weight_passes"], measure.format_bytes(loader.bytes_moved), measure.format_bytes(loader.peak_resident))
    return summary


def main(argv: list[str] | None = None) -> int:
    return entry.stage_main("encode", make_units, argv, imports=("diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha", "transformers.models.t5.modeling_t5", "safetensors.torch"))


if __name__ == "__main__":
    sys.exit(main())
