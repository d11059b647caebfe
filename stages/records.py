"""Records: the self-checksummed JSON a unit publishes after its outputs, which marks it done."""

from __future__ import annotations

import json
import os
from pathlib import Path

from stages.artifacts import not_regular, open_regular
from stages.contract import FORMAT_VERSION, ArtifactError
from stages.files import canonical_json, publish_json, sha256_bytes, sha256_file


def record_checksum(record: dict) -> str:
    return sha256_bytes(canonical_json({k: v for k, v in record.items() if k != "checksum"}).encode())


def write_record(path: Path, record: dict) -> None:
    """Publish a record (sorted keys, self-checksum) after its outputs; it marks the unit done."""
    record = dict(record, format=FORMAT_VERSION)
    record["checksum"] = record_checksum(record)
    publish_json(path, record)


# A record is a few KiB; a bigger file (say a huge sparse one) is damaged, not read whole.
MAX_RECORD_BYTES = 16 << 20


def read_record(path: Path) -> tuple[dict | None, str]:
    """(record, "") when valid, else (None, why it is not usable). Only a regular file is opened
    (stages/artifacts.py): a FIFO, folder or link in its place is a damaged record, never read."""
    kind = not_regular(path)
    if kind == "missing":
        return None, "no record"
    if kind:
        return None, f"record is damaged ({kind}, not a regular file)"
    try:
        with os.fdopen(open_regular(path), "rb") as f:
            data = f.read(MAX_RECORD_BYTES + 1)
        if len(data) > MAX_RECORD_BYTES:
            return None, f"record is damaged (over {MAX_RECORD_BYTES >> 20} MiB)"
        record = json.loads(data.decode())
    except ArtifactError as exc:
        return None, f"record is damaged ({exc})"
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, RecursionError):
        return None, "record is corrupt (not JSON)"
    if not isinstance(record, dict) or record.get("checksum") != record_checksum(record):
        return None, "record is corrupt (checksum mismatch)"
    if record.get("format") != FORMAT_VERSION:
        return None, f"record format {record.get('format')} != {FORMAT_VERSION}"
    return record, ""


class RecordReader:
    """One run's reads: each record is read and checked, and each output hashed, once per run
    (issue 21: a run plans again after each stage that made records, and a unit's record is also
    its downstream's input). What it keeps is small (per record its outputs' hashes, per unit its
    verdict), never whole records, so the orchestrator's memory stays a few hundred bytes per unit.
    Anything is read again when the file changed within the run (a stage rewrote it), told by
    (size, mtime_ns, inode). Nothing is kept across runs: every run compares every record and
    output by content once (STYLE.md: content hashes, not mtimes)."""

    def __init__(self) -> None:
        self._outputs: dict[str, tuple] = {}  # record path -> (stat key, {output name: sha256} or None, why)
        self._hashes: dict[str, tuple] = {}  # output path -> (stat key, sha256)
        self.verdicts: dict[tuple, tuple] = {}  # units.unit_status: (record path, check) -> (stamp, (ok, why))

    @staticmethod
    def stat_key(path: str):
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st.st_size, st.st_mtime_ns, st.st_ino

    def read(self, path) -> tuple[dict | None, str]:
        """read_record's answer (a fresh read), remembering the outputs' hashes it lists."""
        path = str(path)
        key = self.stat_key(path)
        record, why = read_record(path)
        if key is not None:
            outputs = None if record is None else tuple((name, meta.get("sha256")) for name, meta in (record.get("outputs") or {}).items())
            self._outputs[path] = (key, outputs, why)
        return record, why

    def outputs(self, path) -> tuple[dict | None, str]:
        """The record cut to its outputs' hashes ({"outputs": {name: {"sha256": ...}}}, "") or
        (None, why it is not usable); read only when not yet read in this run, or changed since."""
        path = str(path)
        kept = self._outputs.get(path)
        if kept is None or kept[0] != self.stat_key(path):
            record, why = self.read(path)
            kept = self._outputs.get(path) or (None, None, why)
        return (None if kept[1] is None else {"outputs": {name: {"sha256": sha} for name, sha in kept[1]}}), kept[2]

    def sha256(self, path) -> str | None:
        """The file's content hash, None when it is missing."""
        path = str(path)
        key = self.stat_key(path)
        if key is None:
            return None
        kept = self._hashes.get(path)
        if kept is None or kept[0] != key:
            try:
                kept = self._hashes[path] = (key, sha256_file(path))
            except FileNotFoundError:
                return None
        return kept[1]


def output_entry(path: Path, shape=None, dtype=None) -> dict:
    entry = {"sha256": sha256_file(path), "bytes": Path(path).stat().st_size}
    if shape is not None:
        entry["shape"] = list(shape)
    if dtype is not None:
        entry["dtype"] = str(dtype).replace("torch.", "")
    return entry


def versions() -> dict:
    import diffusers
    import torch
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}


def record_context(job: dict, stage: str, device) -> dict:
    """The fields every record of a stage shares: model (with this stage's config hash),
    library versions, device and dtype. Compute once per stage run."""
    model = job["model"]
    return {
        "model": {"given": model["given"], "path": model["path"], "config_hash": model["component_hashes"][stage]},
        "versions": versions(),
        "device": str(device),
        "dtype": job["dtype"],
    }
