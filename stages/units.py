"""Work units: what each stage makes from which inputs, and whether a unit is up to date."""

from __future__ import annotations

import hashlib
import marshal
import os
from dataclasses import dataclass, field
from pathlib import Path

from stages.artifacts import not_regular
from stages.contract import FORMAT_VERSION, ArtifactError, JobFileError
from stages.files import sha256_file, short_hash
from stages.records import read_record, stamp_of
from stages.resolved import slugify, uses_guidance


@dataclass(frozen=True)
class Unit:
    """One artifact a stage makes: `key` names its files, `params` decide it, `inputs` feed it."""

    stage: str
    key: str
    params: dict
    inputs: tuple = ()  # (upstream stage, upstream key) pairs
    items: tuple = ()  # ids of the items that use it
    outputs: tuple = field(default=())  # file names, relative to the stage folder

    def __init__(self, stage: str, key: str, params: dict, inputs: tuple = (), items: tuple = (), outputs: tuple = ()) -> None:
        # The dataclass's own __init__ for a frozen class sets each field through object.__setattr__:
        # 30,000 units of a 10,000-item plan took twice as long.
        self.__dict__.update(stage=stage, key=key, params=params, inputs=inputs, items=items, outputs=outputs)

    def record_path(self, job_dir: Path) -> Path:
        return Path(job_dir) / self.stage / f"{self.key}.json"


def encode_params(job: dict, item: dict) -> dict:
    return {
        "model": job["model"]["component_hashes"]["encode"],
        "dtype": job["dtype"],
        "prompt": item["prompt"],
        # Without guidance the pipeline never encodes the negative prompt.
        "negative_prompt": item["negative_prompt"] if uses_guidance(item) else None,
        "clean_caption": job["clean_caption"],
        "max_sequence_length": job["max_sequence_length"],
    }


def encode_key(params: dict) -> str:
    return f"{slugify(params['prompt'], 24)}-{short_hash(params)}"


def decode_strategy(job: dict) -> dict:
    """The planned decode strategy's pixel-relevant fields (docs/memory.md): a tiled decode differs
    slightly from an untiled one, so switching re-decodes; peak_bytes is left out, since a new
    estimate alone must not."""
    planned = (job.get("runtime") or {}).get("stages", {}).get("decode", {})
    return {"strategy": planned.get("strategy", "full"), "tile_size": planned.get("tile_size")}


def plan_units(job: dict, only: str | None = None) -> dict[str, list[Unit]]:
    """All units of all stages, in job order. Items with equal encode params share one unit.
    `only`: one stage's units (the others' lists are empty): a stage process holds its own alone,
    a third of the memory at 10,000 items."""
    encode: dict[str, Unit] = {}
    imagencode: dict[str, Unit] = {}
    denoise, decode = [], []
    for item in job["items"]:
        if only in (None, "encode", "denoise"):  # denoise names its encode unit
            e_params = encode_params(job, item)
            e_key = encode_key(e_params)
            if only != "denoise":
                prev = encode.get(e_key)
                encode[e_key] = (Unit("encode", e_key, e_params, items=(item["id"],), outputs=(f"{e_key}.safetensors",)) if prev is None
                                 else Unit("encode", e_key, prev.params, items=prev.items + (item["id"],), outputs=prev.outputs))
        i_key = None
        if item.get("init_image") and only in (None, "imagencode", "denoise"):  # img2img: the picture's posterior, shared by its items
            i_params = imagencode_params(job, item)
            i_key = imagencode_key(item, i_params)
            if only != "denoise":
                prev = imagencode.get(i_key)
                imagencode[i_key] = Unit("imagencode", i_key, i_params, items=(prev.items if prev else ()) + (item["id"],),
                                         outputs=(f"{i_key}.safetensors",))
        if only in (None, "denoise"):
            denoise.append(_denoise_unit(job, item, e_key, i_key))
        if only in (None, "decode"):
            decode.append(_decode_unit(job, item))
    return {"encode": list(encode.values()), "imagencode": list(imagencode.values()), "denoise": denoise, "decode": decode}


def _denoise_unit(job: dict, item: dict, e_key: str, i_key: str | None) -> Unit:
    params = {
        "model": job["model"]["component_hashes"]["denoise"],
        "dtype": job["dtype"],
        **{k: item[k] for k in DENOISE_ITEM_KEYS},
    }
    # Keys that newer jobs may set enter only when set, so older artifacts stay valid.
    if job.get("pipeline", "PixArtAlphaPipeline") != "PixArtAlphaPipeline":
        params["pipeline"] = job["pipeline"]
    if job.get("scheduler"):
        params["scheduler"] = job["scheduler"]
    if item.get("timesteps"):
        params["timesteps"] = item["timesteps"]
    inputs: tuple = (("encode", e_key),)
    if i_key is not None:
        inputs += (("imagencode", i_key),)
        params.update({k: item[k] for k in IMG2IMG_ITEM_KEYS if k in item})
    if item.get("loras"):  # content and scale: adding, removing or rescaling one remakes exactly these items
        params["loras"] = [{"sha256": lora["sha256"], "scale": lora["scale"]} for lora in item["loras"]]
    return Unit("denoise", item["id"], params, inputs=inputs, items=(item["id"],), outputs=(f"{item['id']}.safetensors",))


def _decode_unit(job: dict, item: dict) -> Unit:
    params = {
        "model": job["model"]["component_hashes"]["decode"],
        "dtype": job["dtype"],
        "decode": decode_strategy(job),
        # PNG text metadata carries these, so they decide the file's bytes too.
        "metadata": {k: item[k] for k in ("prompt", "negative_prompt", *DENOISE_ITEM_KEYS)} | {"model": job["model"]["given"]}
                    | {k: v for k, v in (("scheduler", job.get("scheduler")), ("timesteps", item.get("timesteps"))) if v}
                    | img2img_metadata(item)
                    | ({"loras": [{"path": lora["given"], "scale": lora["scale"]} for lora in item["loras"]]} if item.get("loras") else {}),
    }
    return Unit("decode", item["id"], params, inputs=(("denoise", item["id"]),), items=(item["id"],),
                outputs=(f"{item['id']}.png", thumbnail_name(item["id"])))


# The denoise params an img2img item adds: the picture's and mask's content hashes (replacing a
# picture remakes exactly the items that use it) and the strength.
IMG2IMG_ITEM_KEYS = ("init_image_sha256", "mask_image_sha256", "strength")


def imagencode_params(job: dict, item: dict) -> dict:
    """What decides a picture's posterior: the VAE, dtype, the picture's content and the size it is
    resized to, and whether the encoder ran tiled (tiles change the numbers slightly)."""
    return {
        "model": job["model"]["component_hashes"]["decode"],  # the VAE's files
        "dtype": job["dtype"],
        "init_image_sha256": item["init_image_sha256"],
        "height": item["image_size"]["height"],
        "width": item["image_size"]["width"],
        "encode": decode_strategy(job),  # the VAE's tiling plan, as decode's
    }


def imagencode_key(item: dict, params: dict) -> str:
    return f"{slugify(os.path.splitext(os.path.basename(item['init_image']))[0], 24)}-{short_hash(params)}"


def img2img_metadata(item: dict) -> dict:
    """The PNG text an img2img item adds: picture names and hashes, and the strength."""
    if not item.get("init_image"):
        return {}
    out = {"init_image": os.path.basename(item["init_image"]), "init_image_sha256": item["init_image_sha256"], "strength": item["strength"]}
    if item.get("mask_image"):
        out.update(mask_image=os.path.basename(item["mask_image"]), mask_image_sha256=item["mask_image_sha256"])
    return out


def thumbnail_name(item_id: str) -> str:
    """The decode stage's small preview of an item's PNG, beside it (the gallery's grid shows it)."""
    return f"{item_id}.thumb.webp"


DENOISE_ITEM_KEYS = ("seed", "width", "height", "guidance_scale", "num_inference_steps", "use_resolution_binning")


def _diff_params(old: dict, new: dict) -> str:
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    parts = []
    for key in changed[:3]:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) or isinstance(b, dict) or len(repr(a)) + len(repr(b)) > 60:
            parts.append(f"{key} changed")
        else:
            parts.append(f"{key} {a!r} -> {b!r}")
    return ", ".join(parts) + (" ..." if len(changed) > 3 else "")


def upstream_output_hash(job_dir: Path, stage: str, key: str, read=read_record) -> tuple[str | None, str]:
    """The sha256 the upstream record lists for its artifact, or (None, why not)."""
    record, why = read(os.path.join(job_dir, stage, f"{key}.json"))  # a str: planning makes ~10 paths per item
    if record is None:
        return None, f"{stage} {key}: {why}"
    outputs = record.get("outputs", {})
    if len(outputs) != 1:
        return None, f"{stage} {key}: record lists {len(outputs)} outputs"
    entry = next(iter(outputs.values()))
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        return None, f"{stage} {key}: record lists no sha256"
    return entry["sha256"], ""


def unit_status(job_dir: Path, unit: Unit, check_outputs: bool = True, reader=None) -> tuple[bool, str]:
    """(up to date, reason). Compares content hashes, never mtimes. `reader`: the run's
    records.RecordReader: a unit whose record, upstream records and outputs have the stat they had
    when it was judged (in this run, or in an earlier one: the job's state cache) keeps that verdict,
    so judging it again reads nothing."""
    # str paths joined by hand: pathlib's parsing, then os.path.join, were each a tenth of a warm
    # 10,000-item plan
    sep = os.sep
    stage_dir = f"{str(job_dir).rstrip(sep + (os.altsep or '')) or sep}{sep}{unit.stage}{sep}"
    root = stage_dir[:-len(unit.stage) - 2] or sep
    path = f"{stage_dir}{unit.key}.json"
    if reader is None:
        return _unit_status(root, unit, path, check_outputs, read_record, read_record,
                            lambda output: sha256_file(output) if os.path.exists(output) else None)
    stat = reader.stat_key
    keys = [stat(path)]
    keys += [stat(f"{root}{sep}{up}{sep}{key}.json") for up, key in unit.inputs]
    keys += [stat(stage_dir + name) for name in unit.outputs]
    stamp = stamp_of(keys)  # taken before judging: a change meanwhile only re-judges
    fingerprint = unit_fingerprint(unit)
    key = f"{path}|{int(check_outputs)}"
    kept = reader.verdict(key, stamp, fingerprint)
    if kept is not None:
        return kept
    verdict = _unit_status(root, unit, path, check_outputs, reader.read, reader.outputs, reader.sha256)
    changed = max((max(k[1], k[3]) for k in keys if k is not None), default=0)  # its newest mtime or ctime: racy or not
    reader.keep_verdict(key, stamp, fingerprint, verdict, changed)
    return verdict


def unit_fingerprint(unit: Unit) -> str:
    """What a verdict depends on besides its files: the unit's params, inputs and outputs and the
    record format. marshal's version 0, not canonical JSON: 5x cheaper per unit, and by value only
    (later versions write shared or interned objects as references, so equal params could give
    other bytes); the bytes follow the params' order, which plan_units keeps, and unequal bytes only
    judge the unit again. Only ever written, to be hashed; nothing here is loaded back."""
    return hashlib.blake2b(marshal.dumps((FORMAT_VERSION, unit.params, unit.inputs, unit.outputs), 0), digest_size=12).hexdigest()


def _unit_status(root: str, unit: Unit, path: str, check_outputs: bool, read, read_upstream, hash_file) -> tuple[bool, str]:
    record, why = read(path)
    if record is None:
        return False, why
    if record.get("params") != unit.params:
        return False, _diff_params(record.get("params") or {}, unit.params)
    recorded_inputs = record.get("inputs", {})
    for stage, key in unit.inputs:
        expected, why = upstream_output_hash(root, stage, key, read_upstream)
        name = f"{stage}/{key}.safetensors"
        if expected is None or recorded_inputs.get(name) != expected:
            return False, f"input {name} changed"
    if set(record.get("outputs", {})) != set(unit.outputs):
        if unit.stage == "decode" and set(record.get("outputs", {})) == set(unit.outputs[:1]):
            return False, "no thumbnail (made by an older version; decode adds it without the VAE)"
        return False, "outputs differ from the expected files"
    if check_outputs:
        for name, meta in record["outputs"].items():
            why = output_problem(os.path.join(root, unit.stage, name), meta, hash_file)
            if why:
                return False, f"{name} {why}"
    return True, "up to date"


def output_problem(path, meta, hasher=sha256_file) -> str:
    """"" when `path` is a regular file with the size and sha256 its record lists, else why not.
    Nothing but a regular file is opened (stages/artifacts.py), and the size is compared first,
    so a huge sparse file in its place costs no hashing. `hasher`: a run's RecordReader.sha256
    hashes each output once per run."""
    kind = not_regular(path)
    if kind:
        return "is missing" if kind == "missing" else f"is damaged ({kind}, not a regular file)"
    if not isinstance(meta, dict):
        return "has a malformed record entry"
    size = os.lstat(path).st_size
    if "bytes" in meta and size != meta["bytes"]:
        return f"is corrupt (sha256 mismatch), {size} bytes where its record says {meta['bytes']}"
    try:
        if hasher(path) != meta.get("sha256"):
            return "is corrupt (sha256 mismatch)"
    except ArtifactError as exc:
        return f"is damaged ({exc})"
    return ""


def verified_input(job_dir: Path, stage_name: str, unit: Unit, upstream: str, key: str) -> tuple[Path, str]:
    """Path and hash of an upstream artifact after checking it against its record, or ArtifactError."""
    job_dir = Path(job_dir)
    expected, why = upstream_output_hash(job_dir, upstream, key)
    path = job_dir / upstream / f"{key}.safetensors"
    fix = f"run `orchestrate run {job_dir / 'job.toml'}` (or `orchestrate run` on your job file) to rebuild {upstream}"
    if expected is None:
        raise ArtifactError(f"{stage_name}: missing {upstream} artifact for item {unit.key} ({why}); {fix}")
    record, _ = read_record(job_dir / upstream / f"{key}.json")
    why = output_problem(path, record["outputs"].get(path.name))
    if why.startswith("is missing"):
        raise ArtifactError(f"{stage_name}: {upstream} artifact {path} for item {unit.key} is missing; {fix}")
    if why:
        raise ArtifactError(f"{stage_name}: {upstream} artifact {path} for item {unit.key} {why} and does not match its record; {fix}")
    return path, expected


def pick_units(units: list[Unit], stage: str, wanted: list[str] | None) -> list[Unit]:
    """The units named in `wanted` (`--units`), in job order; all when None. A name is a unit key,
    or for encode (keyed by text) also the id of an item it serves. Unknown names: JobFileError."""
    if wanted is None:
        return units
    by_name = {unit.key: unit for unit in units}
    for unit in units:
        for item in unit.items:
            by_name.setdefault(item, unit)
    unknown = [name for name in wanted if name not in by_name]
    if unknown:
        example = ", ".join(unit.key for unit in units[:2])
        raise JobFileError(
            f"{stage}: --units names {len(unknown)} unknown unit{'s' if len(unknown) > 1 else ''} ({', '.join(unknown[:3])}"
            f"{' ...' if len(unknown) > 3 else ''}); use keys from `orchestrate status`, e.g. {example}"
        )
    chosen = {by_name[name].key for name in wanted}
    return [unit for unit in units if unit.key in chosen]
