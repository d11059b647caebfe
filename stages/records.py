"""Records: the self-checksummed JSON a unit publishes after its outputs, which marks it done."""

from __future__ import annotations

import json
from pathlib import Path

from stages.contract import FORMAT_VERSION
from stages.files import canonical_json, publish_json, sha256_bytes, sha256_file


def record_checksum(record: dict) -> str:
    return sha256_bytes(canonical_json({k: v for k, v in record.items() if k != "checksum"}).encode())


def write_record(path: Path, record: dict) -> None:
    """Publish a record (sorted keys, self-checksum) after its outputs; it marks the unit done."""
    record = dict(record, format=FORMAT_VERSION)
    record["checksum"] = record_checksum(record)
    publish_json(path, record)


def read_record(path: Path) -> tuple[dict | None, str]:
    """(record, "") when valid, else (None, why it is not usable)."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, "no record"
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return None, "record is corrupt (not JSON)"
    if not isinstance(record, dict) or record.get("checksum") != record_checksum(record):
        return None, "record is corrupt (checksum mismatch)"
    if record.get("format") != FORMAT_VERSION:
        return None, f"record format {record.get('format')} != {FORMAT_VERSION}"
    return record, ""


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
