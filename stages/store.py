"""The embedding store: prompt embeddings shared by every job of a workdir (issue 11, point 2).

`<workdir>/.store/encode/<key>.safetensors` and `<key>.json`. The key is the encode unit's key: a
hash of what decides the embedding (the T5 and tokenizer hash, dtype, prompt, negative prompt when
guidance uses it, clean_caption, max_sequence_length), so equal keys mean equal bytes. The encode
stage takes a unit whose key is in the store (a hard link, or a copy across filesystems), after
checking the entry's bytes against its record's sha256, and writes the unit's own record; when
every unit is found it never loads T5. Each artifact it computes goes into the store after the
job's own record. Every write is atomic (temporary file, then rename), so concurrent jobs may
publish the same key: the bytes are equal and the last rename wins. A damaged entry is removed
and the unit computed again. `orchestrate run --no-store` turns the store off for a run.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from stages import files, records


def entry_paths(store: Path, key: str) -> tuple[Path, Path]:
    return Path(store) / f"{key}.safetensors", Path(store) / f"{key}.json"


def take(store: Path, job_dir: Path, unit, log) -> dict | None:
    """Put the store's artifact for `unit` into the job's encode folder; returns the store record,
    or None when there is no usable entry (a damaged one is removed, and said)."""
    artifact, record_path = entry_paths(store, unit.key)
    if not record_path.exists():
        return None
    record, why = records.read_record(record_path)
    if record is None or record.get("params") != unit.params or not artifact.exists():
        log.warning("encode: store entry %s unusable (%s); computing it again", unit.key, why or "params or file differ")
        remove(store, unit.key)
        return None
    if files.sha256_file(artifact) != record["sha256"]:
        log.warning("encode: store entry %s is damaged (sha256 mismatch); removed, computing it again", unit.key)
        remove(store, unit.key)
        return None
    out = Path(job_dir) / "encode" / f"{unit.key}.safetensors"
    files.publish(out, lambda tmp: _link_or_copy(artifact, Path(tmp)))
    if files.sha256_file(out) != record["sha256"]:  # a copy that went wrong: never accepted
        out.unlink()
        return None
    return record


def put(store: Path, job_dir: Path, unit, tensors: dict) -> None:
    """Add a freshly computed artifact (already published in the job, with its record) to the store."""
    store = Path(store)
    store.mkdir(parents=True, exist_ok=True)
    source = Path(job_dir) / "encode" / f"{unit.key}.safetensors"
    artifact, record_path = entry_paths(store, unit.key)
    files.publish(artifact, lambda tmp: _link_or_copy(source, Path(tmp)))
    records.write_record(record_path, {"stage": "encode-store", "key": unit.key, "params": unit.params,
                                        "sha256": files.sha256_file(artifact), "bytes": artifact.stat().st_size, "tensors": tensors})


def remove(store: Path, key: str) -> None:
    for path in entry_paths(store, key):
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link (no bytes copied; artifacts are never modified in place, only replaced), else a
    copy (another filesystem, or links not allowed)."""
    try:
        if target.exists():
            target.unlink()
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
