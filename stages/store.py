"""The embedding store: prompt embeddings shared by every job of a workdir (issue 11, point 2).

`<workdir>/.store/encode/<key>.safetensors` and `<key>.json`. The key is the encode unit's key: a
hash of what decides the embedding (the T5 and tokenizer hash, dtype, prompt, negative prompt when
guidance uses it, clean_caption, max_sequence_length), so equal keys mean equal bytes. The encode
stage takes a unit whose key is in the store (a hard link, or a copy across filesystems), after
checking the entry's bytes against its record's sha256, and writes the unit's own record; when
every unit is found it never loads T5. Each artifact it computes goes into the store after the
job's own record. Every write is atomic (temporary file, then rename), so concurrent jobs may
publish the same key: the bytes are equal and the last rename wins. A damaged entry is removed
and the unit computed again, as is anything there that is not a regular file, or whose tensors
are not what the model makes (names, dtype, shapes). `orchestrate run --no-store` turns the store
off for a run.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from stages import artifacts, files, records


def entry_paths(store: Path, key: str) -> tuple[Path, Path]:
    return Path(store) / f"{key}.safetensors", Path(store) / f"{key}.json"


def take(store: Path, job_dir: Path, unit, log, expected: dict | None = None) -> dict | None:
    """Put the store's artifact for `unit` into the job's encode folder; returns the store record,
    or None when there is no usable entry (a damaged one is removed, and said). Only regular files
    are read or taken (stages/artifacts.py): a FIFO, folder or link in the store is damaged, and
    the artifact's tensors must be `expected` ({name: (dtype, shape)}, from the model's config)."""
    artifact, record_path = entry_paths(store, unit.key)
    if artifacts.not_regular(record_path) == "missing":  # none, or another job's put() is between its two writes
        return None
    damaged = [f"{p.name} is {kind}" for p in (record_path, artifact) if (kind := artifacts.not_regular(p)) not in ("", "missing")]
    if damaged:
        return _discard(store, unit.key, log, f"{', '.join(damaged)}, not a regular file")
    record, why = records.read_record(record_path)
    if record is None or record.get("params") != unit.params or artifacts.not_regular(artifact):
        log.warning("encode: store entry %s unusable (%s); computing it again", unit.key, why or "params or file differ")
        remove(store, unit.key, log)
        return None
    why = "no expected tensors (the text encoder's config gives no width)" if expected is None else artifacts.mismatch(artifact, expected)
    if why:
        return _discard(store, unit.key, log, why)
    if artifact.lstat().st_size != record.get("bytes") or files.sha256_file(artifact) != record.get("sha256"):
        log.warning("encode: store entry %s is damaged (sha256 mismatch); removed, computing it again", unit.key)
        remove(store, unit.key, log)
        return None
    out = Path(job_dir) / "encode" / f"{unit.key}.safetensors"
    try:
        files.publish(out, lambda tmp: _link_or_copy(artifact, Path(tmp)))
    except artifacts.ArtifactError as exc:  # swapped for a link or FIFO since the checks above
        return _discard(store, unit.key, log, str(exc))
    if artifacts.not_regular(out) or files.sha256_file(out) != record["sha256"]:  # a copy that went wrong: never accepted
        out.unlink()
        return None
    return record


def _discard(store: Path, key: str, log, why: str) -> None:
    log.warning("encode: store entry %s is damaged (%s); removed, computing it again", key, why)
    remove(store, key, log)
    return None


def put(store: Path, job_dir: Path, unit, tensors: dict, log) -> None:
    """Add a freshly computed artifact (already published in the job, with its record) to the store."""
    store = Path(store)
    store.mkdir(parents=True, exist_ok=True)
    source = Path(job_dir) / "encode" / f"{unit.key}.safetensors"
    artifact, record_path = entry_paths(store, unit.key)
    if not all(artifacts.clear_damaged(p, log, "encode") for p in (artifact, record_path)):
        return  # a damaged entry that cannot be removed: the store goes without this one (said)
    files.publish(artifact, lambda tmp: _link_or_copy(source, Path(tmp)))
    records.write_record(record_path, {"stage": "encode-store", "key": unit.key, "params": unit.params,
                                        "sha256": files.sha256_file(artifact), "bytes": artifact.stat().st_size, "tensors": tensors})


def remove(store: Path, key: str, log) -> None:
    """Remove a store entry's two files; a folder or link in their place too (a link itself,
    never its target), and one that cannot be removed is left with a warning."""
    for path in entry_paths(store, key):
        if artifacts.not_regular(path) == "":
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        else:
            artifacts.clear_damaged(path, log, "encode")


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link (no bytes copied; artifacts are never modified in place, only replaced), else a
    copy (another filesystem, or links not allowed)."""
    if artifacts.not_regular(source):  # never a link: link() would link the link, a copy follow it
        raise artifacts.ArtifactError(f"{source} is not a regular file")
    try:
        if target.exists() or target.is_symlink():
            target.unlink()
        os.link(source, target)
    except OSError:
        with os.fdopen(artifacts.open_regular(source), "rb") as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
