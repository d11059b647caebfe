"""The job file: TOML -> frozen dataclasses -> the resolved job the stages read.

Every check on user input happens here, before anything is written or any model is loaded. Each
error is a `JobFileError` whose message names the table, the key, the value and the fix.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import os
import re
import secrets
import stat
import tomllib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from orchestrator.jobfile.prompts import prompt_list_tables, read_prompt_lines
from stages import family
from stages.contract import FORMAT_VERSION, JobFileError
from stages.files import MAX_TEXT_BYTES, canonical_json, read_bytes_limited, read_json_limited
from stages.resolved import hub_snapshot, slugify, windows_reserved
from stages.weights import check_weight_files

DTYPES = ("float16", "bfloat16", "float32")
MAX_ITEMS = 100_000  # images per job: a dataset's queue (issue 21); the plan and a no-op rerun stay linear
# One entry's `count`: more than this in one [[generation]] is almost certainly a typo (an extra
# zero); a dataset of many images of one prompt writes several entries, or a prompts_file.
MAX_COUNT = 10_000
MAX_SIDE = 4096  # the largest 1024-bin is 2048 px; 4096 leaves room for the unbinned case
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a 64-bit integer
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


@dataclass(frozen=True)
class JobSettings:
    """The `[job]` table."""

    model: str
    name: str | None = None
    dtype: str | None = None  # None: float16 on CUDA, float32 on CPU
    clean_caption: bool = True  # as in PixArtAlphaPipeline.__call__
    max_sequence_length: int | None = None  # None: the family's (α 120, Σ 300), as its pipeline
    pipeline: str | None = None  # PixArtAlphaPipeline | PixArtSigmaPipeline; None: detected (stages/family.py)
    scheduler: str | None = None  # a diffusers scheduler class, from_config of the model's; None: the model's own


@dataclass(frozen=True)
class GenerationParams:
    """One `[[generation]]` entry, after `[defaults]` are applied. Defaults are diffusers' own."""

    prompt: str
    negative_prompt: str = ""
    width: int | None = None  # None: the model's sample_size x VAE scale factor
    height: int | None = None
    guidance_scale: float = 4.5
    num_inference_steps: int = 20
    use_resolution_binning: bool = True
    seed: int | None = None  # None: drawn once, then kept in job.resolved.json
    count: int = 1
    timesteps: tuple | None = None  # custom timesteps, as the pipeline's `timesteps=` (DMD: [400]); sets the step count
    image: str | None = None  # img2img: the start picture, relative to the job file (docs/img2img.md)
    strength: float = 0.8  # how much of the picture is repainted, as diffusers' img2img (its default)
    mask: str | None = None  # inpainting: white = repaint, black = keep; the image's size
    loras: tuple | None = None  # ((path or hub id, scale), ...): LoRA adapters for denoise (stages/lora.py)


@dataclass(frozen=True)
class Job:
    settings: JobSettings
    generations: tuple[GenerationParams, ...]
    source: Path
    components: tuple = ()  # ((diffusers component name, hub id or folder), ...) from [job.components]
    model_base: Path | None = None  # where a relative model path starts: None, the job file's folder; --model: the current directory


# The diffusers pipeline's components; [job.components] may take any of them from elsewhere.
COMPONENTS = ("text_encoder", "tokenizer", "transformer", "vae", "scheduler")


_TABLES = {"job": JobSettings, "defaults": GenerationParams, "generation": GenerationParams}


def _suggest(key: str, valid) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(valid))}"


def _check_type(where: str, key: str, value, annotation: str):
    """Return `value` if it fits the field's annotation (ints are fine for floats), else raise."""
    base = annotation.replace(" | None", "")
    ok = {
        "str": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "tuple": isinstance(value, list) and bool(value) and all(isinstance(v, int) and not isinstance(v, bool) for v in value),
    }[base]
    if not ok:
        raise JobFileError(
            f"{where}: '{key}' must be {'a list of integers' if base == 'tuple' else ('a' if base != 'int' else 'an') + ' ' + base}, "
            f"not {type(value).__name__} {value!r}; write e.g. {key} = {_EXAMPLES.get(key, _EXAMPLES[base])}"
        )
    return float(value) if base == "float" else tuple(value) if base == "tuple" else value


# What a correct value looks like in TOML, for the fix in type errors: per key, else per type.
_EXAMPLES = {"width": "1024", "height": "1024", "seed": "42", "num_inference_steps": "20", "count": "1",
             "max_sequence_length": "120", "guidance_scale": "4.5", "dtype": '"float16"', "name": '"my-job"',
             "model": '"PixArt-alpha/PixArt-XL-2-1024-MS"', "prompt": '"a red apple"',
             "timesteps": "[400]", "scheduler": '"EulerAncestralDiscreteScheduler"', "pipeline": '"PixArtSigmaPipeline"',
             "image": '"photo.png"', "mask": '"mask.png"', "strength": "0.8",
             "str": '"text"', "int": "1", "float": "1.0", "bool": "true", "tuple": "[999, 500]"}


def _shown(key: str) -> str:
    """A key from the file as it can be printed on one line (escapes newlines and the like)."""
    return repr(key)[1:-1]


def _read_table(where: str, table, cls, exclude=(), also=()) -> dict:
    """The table's values, type-checked against `cls`'s fields; `also` names keys the caller reads
    itself (skipped here, offered as suggestions)."""
    if not isinstance(table, dict):
        raise JobFileError(f"{where} must be a table (a [header] followed by key = value lines), not {type(table).__name__}")
    valid = {f.name: f.type for f in fields(cls) if f.name not in exclude}
    out = {}
    for key, value in table.items():
        if key in also:
            continue
        if key not in valid:
            raise JobFileError(f"{where}: unknown key '{_shown(key)}'{_suggest(key, [*valid, *also])}")
        out[key] = _read_loras(where, value) if key == "loras" else _check_type(where, key, value, valid[key])
    return out


def _read_loras(where: str, value) -> tuple:
    """`loras = [{ path = "...", scale = 0.8 }, ...]` as ((path, scale), ...); scale defaults to 1.0."""
    fix = 'write e.g. loras = [{ path = "style-lora", scale = 0.8 }]'
    if not isinstance(value, list):
        raise JobFileError(f"{where}: 'loras' must be a list of tables, not {type(value).__name__}; {fix}")
    out = []
    for n, entry in enumerate(value, 1):
        if not isinstance(entry, dict) or set(entry) - {"path", "scale"} or not isinstance(entry.get("path"), str) or not entry["path"].strip():
            bad = sorted(set(entry) - {"path", "scale"}) if isinstance(entry, dict) else None
            raise JobFileError(f"{where}: loras #{n} " + (f"has an unknown key {_shown(bad[0])!r} (valid: path, scale)" if bad else
                               "needs a 'path' (a LoRA file or folder relative to the job file, or a hub id)") + f"; {fix}")
        scale = entry.get("scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or abs(scale) > 100:
            raise JobFileError(f"{where}: loras #{n} 'scale' = {scale!r} must be a finite number from -100 to 100 (1.0: as trained, 0: off); {fix}")
        out.append((entry["path"], float(scale)))
    return tuple(out)


def _check_range(where: str, gen: GenerationParams) -> None:
    def bad(key, value, rule):
        raise JobFileError(f"{where}: '{key}' = {value!r} is out of range; it must be {rule}")

    if not 1 <= gen.num_inference_steps <= 1000:
        bad("num_inference_steps", gen.num_inference_steps, "between 1 and 1000 (the scheduler's training steps)")
    if not math.isfinite(gen.guidance_scale) or not 0 <= gen.guidance_scale <= 100:
        bad("guidance_scale", gen.guidance_scale, "a finite number from 0 to 100 (<= 1 turns guidance off)")
    if not 1 <= gen.count <= MAX_COUNT:
        bad("count", gen.count, f"between 1 and {MAX_COUNT} per entry (a guard against a typo; for more images of one "
                                f"prompt, repeat the entry: up to {MAX_ITEMS} images per job)")
    if gen.seed is not None and not 0 <= gen.seed <= MAX_SEED:
        bad("seed", gen.seed, f"between 0 and {MAX_SEED}")
    if gen.timesteps is not None:
        if any(not 0 <= t < 1000 for t in gen.timesteps) or any(a <= b for a, b in zip(gen.timesteps, gen.timesteps[1:])):
            bad("timesteps", list(gen.timesteps), "a list of distinct integers from 999 down to 0, in descending order (e.g. [400])")
    if not math.isfinite(gen.strength) or not 0 < gen.strength <= 1:
        bad("strength", gen.strength, "a number above 0 and at most 1 (diffusers' img2img strength; 0.8 by default)")
    if gen.mask is not None and gen.image is None:
        raise JobFileError(f"{where}: 'mask' needs an 'image' to repaint; add image = \"photo.png\" or remove 'mask'")
    if gen.image is not None and int((len(gen.timesteps) if gen.timesteps else gen.num_inference_steps) * gen.strength) < 1:
        bad("strength", gen.strength, "large enough that num_inference_steps x strength is at least 1 (no step would run)")
    for key in ("width", "height"):
        value = getattr(gen, key)
        if value is not None and not 16 <= value <= MAX_SIDE:
            bad(key, value, f"between 16 and {MAX_SIDE} pixels")
        if value is not None and not gen.use_resolution_binning and value % 16:
            raise JobFileError(
                f"{where}: '{key}' = {value} cannot be made without resolution binning: it must be a multiple of 16 "
                f"(VAE factor 8 x patch 2); use {value - value % 16 or 16} or {value - value % 16 + 16}, or set use_resolution_binning = true"
            )


def load_job(path: Path, model: str | None = None) -> Job:
    """Parse and check a job file, or a prompt list (a `.txt` file, one prompt per line) run with
    `model` (orchestrator/jobfile/prompts.py). Raises JobFileError with a one-line message on any problem."""
    path = Path(path)
    if path.suffix.lower() == ".txt":
        if not os.path.lexists(path) or path.is_dir():  # a FIFO or device is refused where the list is read
            raise JobFileError(f"prompt list {path} {'is a folder, not a file' if path.is_dir() else 'not found'}; check the path")
        if not _NAME.match(path.stem):
            raise JobFileError(f"prompt list {path.name}: its name {path.stem!r} names the job folder and is not a safe folder name; "
                               f"rename the file using letters, digits, '.', '_' and '-'")
        # --model, like every command-line path, is relative to the current directory (a hub id
        # `org/name` is never looked up as <list folder>/org/name).
        return replace(_job_from_tables(prompt_list_tables(path, model), path), model_base=Path.cwd())
    if model is not None:
        raise JobFileError(f"--model is only for a prompt list (.txt); {path.name} is a job file: set model in its [job] table and leave out --model")
    try:
        text = read_bytes_limited(path, MAX_TEXT_BYTES, "job file", fix="give the job's TOML file").decode("utf-8")
    except FileNotFoundError:
        raise JobFileError(f"job file {path} not found; check the path") from None
    except (OSError, ValueError) as exc:
        raise JobFileError(f"job file {path} cannot be read ({exc}); save it as UTF-8 text") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise JobFileError(f"{path.name}: not valid TOML ({exc}); fix the syntax at that line") from None
    return _job_from_tables(data, path)


def _job_from_tables(data: dict, path: Path) -> Job:
    """The checked Job for a parsed job file's tables (`path` names it in messages and anchors
    relative paths)."""
    for key in data:
        if key not in _TABLES:
            raise JobFileError(f"{path.name}: unknown table '[{_shown(key)}]'{_suggest(key, _TABLES)}")
    if "job" not in data:
        raise JobFileError(f"{path.name}: missing [job] table; add [job] with model = \"PixArt-alpha/PixArt-XL-2-1024-MS\"")
    job_table = dict(data["job"]) if isinstance(data["job"], dict) else data["job"]
    components = _read_components(path.name, job_table.pop("components", {}) if isinstance(job_table, dict) else {})
    settings_values = _read_table(f"{path.name} [job]", job_table, JobSettings)
    if "model" not in settings_values or not settings_values["model"].strip():
        raise JobFileError(f"{path.name} [job]: 'model' is required: a hub id or a local diffusers folder")
    settings = JobSettings(**settings_values)
    if settings.dtype is not None and settings.dtype not in DTYPES:
        raise JobFileError(f"{path.name} [job]: 'dtype' = {settings.dtype!r} is not one of {', '.join(DTYPES)}")
    if settings.pipeline is not None and settings.pipeline not in family.FAMILIES:
        close = difflib.get_close_matches(settings.pipeline, list(family.FAMILIES), n=1, cutoff=0.5)
        raise JobFileError(
            f"{path.name} [job]: 'pipeline' = {settings.pipeline!r} is not a PixArt pipeline{f' (did you mean {close[0]}?)' if close else ''}; "
            f"use one of {', '.join(family.FAMILIES)}, or leave it out to detect it from the model"
        )
    if settings.max_sequence_length is not None and not 1 <= settings.max_sequence_length <= 512:
        raise JobFileError(f"{path.name} [job]: 'max_sequence_length' = {settings.max_sequence_length} must be between 1 and 512 (T5's limit)")
    name = settings.name if settings.name is not None else path.stem
    if not _NAME.match(name) or name in (".", ".."):
        raise JobFileError(
            f"{path.name} [job]: name {name!r} is not a safe folder name; use letters, digits, '.', '_' and '-' (set name = \"...\")"
        )
    if windows_reserved(name) or name.endswith("."):  # refused everywhere, so a job folder can be copied to Windows
        why = "a device name Windows reserves (CON, PRN, AUX, NUL, COM1-9, LPT1-9, with any extension)" if windows_reserved(name) \
            else "a name ending in a dot, which Windows drops"
        raise JobFileError(f"{path.name} [job]: name {name!r} is {why}; choose another (set name = \"...\")")
    settings = JobSettings(**{**asdict(settings), "name": name})
    defaults = _read_table(f"{path.name} [defaults]", data.get("defaults", {}), GenerationParams, exclude=("prompt",))
    entries = data.get("generation", [])
    if isinstance(entries, dict):
        raise JobFileError(f"{path.name}: write [[generation]] (double brackets), not [generation]; each [[generation]] adds one prompt to the queue")
    if not isinstance(entries, list) or not entries:
        raise JobFileError(f"{path.name}: the queue is empty; add at least one [[generation]] with a prompt")
    generations = []
    total = 0
    for n, entry in enumerate(entries, 1):
        # A bare prompt list (`orchestrate run prompts.txt`) has one generated entry: name only its lines.
        where = f"{path.name} [[generation]] #{n}" if path.suffix.lower() != ".txt" else ""
        values = {**defaults, **_read_table(where, entry, GenerationParams, also=("prompts_file",))}
        for where_line, gen in _expand_entry(where, entry, values, path):
            _check_range(where_line, gen)
            total += gen.count
            if total > MAX_ITEMS:
                raise JobFileError(f"{where_line}: the queue would hold {total} images, more than {MAX_ITEMS}; lower 'count' or split the job")
            generations.append(gen)
    return Job(settings, tuple(generations), path.resolve(), components)


def _expand_entry(where: str, entry: dict, values: dict, path: Path) -> list[tuple[str, GenerationParams]]:
    """One [[generation]] entry as (where, generation) pairs: itself, or with `prompts_file` one per
    prompt line, line k (from 0) seeded `seed + k * count` when the entry has a seed."""
    if "prompts_file" not in entry:
        if "prompt" not in values:
            raise JobFileError(f"{where}: 'prompt' is required (use prompt = \"\" for an empty prompt, or prompts_file = \"prompts.txt\")")
        return [(where, GenerationParams(**values))]
    if "prompt" in entry:
        raise JobFileError(f"{where}: 'prompt' and 'prompts_file' are both set; keep one (prompts_file makes one generation per line of the file)")
    given = entry["prompts_file"]
    if not isinstance(given, str) or not given.strip():
        raise JobFileError(f"{where}: 'prompts_file' must be a file name (a string), not {type(given).__name__} {given!r}; "
                           f"write e.g. prompts_file = \"prompts.txt\"")
    file = path.parent / Path(given).expanduser()
    out = []
    for k, (line, prompt) in enumerate(read_prompt_lines(file, where)):
        seed = values.get("seed")
        gen = GenerationParams(**{**values, "prompt": prompt, **({"seed": seed + k * values.get("count", 1)} if seed is not None else {})})
        out.append((f"{where} ({_shown(given)} line {line})" if where else f"{_shown(given)} line {line}", gen))
    return out


def _read_components(file_name: str, table) -> tuple:
    """[job.components]: component name -> hub id or folder holding that component's subfolder."""
    where = f"{file_name} [job.components]"
    if not isinstance(table, dict):
        raise JobFileError(f"{where} must be a table of component = \"hub id or folder\", e.g. transformer = \"PixArt-alpha/PixArt-Sigma-XL-2-2K-MS\"")
    out = []
    for key, value in table.items():
        if key not in COMPONENTS:
            raise JobFileError(f"{where}: unknown component '{_shown(key)}'{_suggest(key, COMPONENTS)}")
        if not isinstance(value, str) or not value.strip():
            raise JobFileError(f"{where}: '{key}' must be a hub id or a folder (a string), not {value!r}")
        out.append((key, value))
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# The model


def _hash_files(root: Path, patterns) -> str:
    """sha256 over the listed config files, plus the names, sizes and sampled content of weight
    files (the T5 alone is 19 GB); see the README's note on what this catches."""
    digest = hashlib.sha256()
    for pattern in patterns:
        for file in sorted(root.glob(pattern)):
            rel = file.relative_to(root).as_posix()
            if file.suffix == ".safetensors":
                digest.update(f"{rel}:{file.stat().st_size}:{_sample_weights(file)}\n".encode())
            elif file.is_file():  # streamed (the same digest as reading it whole): a huge file must not fill memory
                digest.update(f"{rel}\n".encode())
                with open(file, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        digest.update(chunk)
    return digest.hexdigest()[:16]


_SAMPLES, _SAMPLE_BYTES = 16, 1 << 16


def _sample_weights(file: Path) -> str:
    """sha256 of 16 chunks of 64 KiB spread evenly over a weight file, header included: other
    weights of the same shapes (a fine-tune, a re-download of another revision) change it, for
    1 MiB read per file instead of the whole file."""
    size = file.stat().st_size
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for n in range(_SAMPLES):
            f.seek(max(0, (size - _SAMPLE_BYTES) * n // (_SAMPLES - 1)))
            digest.update(f.read(_SAMPLE_BYTES))
    return digest.hexdigest()[:16]


# What decides each stage's output: (component, files of it).
_STAGE_FILES = {
    "encode": (("text_encoder", "text_encoder/*"), ("tokenizer", "tokenizer/*")),
    "denoise": (("transformer", "transformer/*"), ("scheduler", "scheduler/*"), ("vae", "vae/config.json")),
    "decode": (("vae", "vae/*"),),
}


def component_hashes(roots) -> dict:
    """Per-stage hash of the files that decide each stage's output, each read from the folder its
    component comes from (`roots`: one model folder, or component -> folder holding <component>/).
    A model in one local folder hashes as it always did. A hub snapshot whose weights its stage
    has not fetched yet is hashed by its configs and its commit, which pins the weights."""
    roots = roots if isinstance(roots, dict) else {part: roots for part in COMPONENTS}
    hashes = {}
    for stage, parts in _STAGE_FILES.items():
        by_root: dict[Path, list[str]] = {}
        for part, pattern in parts:
            by_root.setdefault(Path(roots[part]), []).append(pattern)
        digests = []
        for root, patterns in by_root.items():
            snapshot = hub_snapshot(root)
            if snapshot is None:
                digests.append(_hash_files(root, patterns))
            else:
                configs = [p.replace("/*", "/*.json") if p.split("/")[0] in ("text_encoder", "transformer", "vae") else p for p in patterns]
                digests.append(f"{_hash_files(root, configs)}@{root.parent.parent.name}@{snapshot[1]}")
        hashes[stage] = digests[0] if len(digests) == 1 and "@" not in digests[0] else _combine(*digests)
    return hashes


def _combine(*digests: str) -> str:
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()[:16]


# What the orchestrator fetches from the hub to plan (configs, tokenizer, scheduler); each stage
# fetches its own component's weights (stages/resolved.py component_root).
_HUB_CONFIGS = ["model_index.json", "*/config.json", "*/*.safetensors.index.json", "scheduler/*.json", "tokenizer/*"]


def _locate(given: str, job_dir: Path, what: str, patterns: list[str], key: str = "'model' in [job]") -> tuple[Path, str | None]:
    """A local folder (relative to the job file) or a hub id resolved to a local snapshot holding
    `patterns`: (folder, hub repo id or None)."""
    candidate = (job_dir / Path(given).expanduser()).resolve()
    looks_like_path = given.startswith((".", "/", "~")) or candidate.exists() or given.count("/") != 1
    if looks_like_path:
        if not candidate.is_dir():
            raise JobFileError(f"{what} folder {candidate} does not exist; fix {key} (a local path is relative to the job file)")
        return candidate, None
    return _download(given, candidate, what, patterns, key), given


def _check_weights(given: str, root: Path, part: str, what: str) -> None:
    """Safetensors weights in <root>/<part>, each whole by its header (issue 17, point 6), or a
    one-line JobFileError before any stage starts."""
    check_weight_files(root / part, f"{what} {given!r}")
    if not any((root / part).glob("*.safetensors")):
        pickles = sorted(p.name for p in (root / part).iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
        found = f"only pickle weights ({pickles[0]})" if pickles else "no .safetensors weights"
        raise JobFileError(
            f"{what} {given!r}: {part}/ has {found}; weights are loaded from safetensors only (never pickle): "
            f"convert it with `orchestrate convert {root / part}`" if pickles else
            f"{what} {given!r}: {part}/ has {found}; weights are loaded from safetensors only (never pickle)"
        )


def _check_regular_files(given: str, root: Path, part: str, what: str) -> None:
    """Every file in <root>/<part> is a regular file (a link to one is fine): a FIFO there would
    hang the stage that loads the component, a link to /dev/zero fill its memory (issue 17)."""
    for entry in sorted((root / part).iterdir()):
        try:
            mode = os.stat(entry).st_mode
        except OSError as exc:  # a broken link, a loop
            raise JobFileError(f"{what} {given!r}: {_shown(str(entry))} cannot be read ({exc.strerror}); the model folder is damaged; download it again") from None
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise JobFileError(f"{what} {given!r}: {_shown(str(entry))} is not a regular file (a FIFO, device or socket); "
                               f"the model folder is damaged; download it again")


def resolve_model(given: str, job_dir: Path, require_weights: bool = True, parts=COMPONENTS) -> Path:
    """The base model folder, holding every component in `parts` (those [job.components] does not
    name). `require_weights=False` accepts a folder of configs only (`orchestrate plan` reads no
    weights)."""
    candidate, repo = _locate(given, job_dir, "model", _HUB_CONFIGS)
    if not (candidate / "model_index.json").exists():
        raise JobFileError(f"model {given!r} at {candidate} has no model_index.json; point 'model' at a diffusers folder (save_pretrained layout)")
    for part in parts:
        if not (candidate / part).is_dir():
            found = sorted(p.name for p in candidate.iterdir() if p.is_dir() and not p.name.startswith("."))
            raise JobFileError(
                f"model {given!r} at {candidate} has no {part}/ folder (found: {', '.join(found) or 'none'}); use a complete PixArt "
                f"diffusers folder, or name where {part} comes from in [job.components], e.g. {part} = \"folder or hub id\""
            )
        _check_regular_files(given, candidate, part, "model")
    for part in (p for p in ("text_encoder", "transformer", "vae") if p in parts) if require_weights and repo is None else ():
        _check_weights(given, candidate, part, "model")
    return candidate


def component_patterns(part: str) -> list[str]:
    """What the orchestrator fetches of a [job.components] hub repo: the whole small component
    (tokenizer, scheduler), else its configs; the stage fetches the weights."""
    return [f"{part}/*"] if part in ("tokenizer", "scheduler") else [f"{part}/config.json", f"{part}/*.safetensors.index.json"]


def resolve_component(part: str, given: str, job_dir: Path, require_weights: bool = True) -> Path:
    """The folder a [job.components] entry names: a local folder or hub repo holding <part>/."""
    what = f"[job.components] {part}"
    candidate, repo = _locate(given, job_dir, what, component_patterns(part), f"'{part}' in [job.components]")
    if not (candidate / part).is_dir():
        raise JobFileError(f"{what} = {given!r}: {candidate} has no {part}/ folder; name a folder or hub repo that holds {part}/")
    _check_regular_files(given, candidate, part, what)
    if require_weights and repo is None and part in ("text_encoder", "transformer", "vae"):
        _check_weights(given, candidate, part, what)
    return candidate


def _download(repo_id: str, local: Path, what: str = "model", patterns: list[str] = _HUB_CONFIGS, key: str = "'model' in [job]") -> Path:
    """Snapshot of a hub repo, only the files matching `patterns` (never pickles). Honors HF_HUB_OFFLINE."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        raise JobFileError(
            f"{what} {repo_id!r} is not a local folder ({local} does not exist), not in the Hugging Face cache, and the hub "
            f"cannot be reached (offline mode or no network); download it once with `hf download {repo_id}` or fix {key}"
        ) from None
    except RepositoryNotFoundError:
        raise JobFileError(f"{what} {repo_id!r} is not a repository on the Hugging Face hub; check the id ({key})") from None
    except Exception as exc:  # network errors come in many classes
        raise JobFileError(f"{what} {repo_id!r} could not be fetched ({type(exc).__name__}: {exc}); check the network or use a local folder") from None


def _read_json(path: Path) -> dict:
    """A model config (at most 1 MiB, a regular file), or a one-line JobFileError."""
    try:
        config = read_json_limited(path, "model config", fix="the model folder is damaged; download it again")
    except OSError as exc:
        raise JobFileError(f"{path} cannot be read as JSON ({exc}); the model folder is damaged") from None
    if not isinstance(config, dict):
        raise JobFileError(f"model config {path} holds a JSON {type(config).__name__}, not an object; the model folder is damaged; download it again")
    return config


# ---------------------------------------------------------------------------------------------
# Resolution: the file the stages read


def resolve_job(job: Job, job_dir: Path, device: str, runtime: dict | None = None, require_weights: bool = True) -> dict:
    """The fully resolved job: defaults filled, seeds drawn (or reused), paths absolute."""
    job_dir = Path(job_dir)
    composed = dict(job.components)
    model_path = resolve_model(job.settings.model, job.model_base or job.source.parent, require_weights, [p for p in COMPONENTS if p not in composed])
    roots = {part: model_path for part in COMPONENTS}
    components = {}
    for part, given in composed.items():
        roots[part] = resolve_component(part, given, job.source.parent, require_weights)
        components[part] = {"given": given, "path": str(roots[part])}
    transformer_config = _read_json(roots["transformer"] / "transformer" / "config.json")
    vae_config = _read_json(roots["vae"] / "vae" / "config.json")
    model_index = _read_json(model_path / "model_index.json")
    _check_pixart(job.settings.model, model_path, model_index, transformer_config, roots["transformer"], job.settings.pipeline)
    pipeline, pipeline_source = family.detect(job.settings.pipeline, model_index, transformer_config, vae_config)
    chosen = family.of(pipeline)
    scheduler_name = _check_scheduler(job, roots["scheduler"])
    default_side = transformer_config["sample_size"] * 2 ** (len(vae_config["block_out_channels"]) - 1)
    if transformer_config.get("sample_size") not in chosen.bins and any(g.use_resolution_binning for g in job.generations):
        raise JobFileError(
            f"model {job.settings.model!r}: resolution binning in {chosen.name} needs a transformer sample_size of "
            f"{', '.join(str(s) for s in sorted(chosen.bins))}, not {transformer_config.get('sample_size')}; "
            f"set use_resolution_binning = false in [defaults]"
        )
    dtype = job.settings.dtype or ("float32" if device == "cpu" else "float16")
    previous = _previous_seeds(job_dir)
    lora_cache: dict = {}
    drawn = {}
    seen: dict[str, int] = {}
    items = []
    pictures = img2img_pictures(job, [gen for gen in job.generations])  # read and checked once per file
    for n, gen in enumerate(job.generations, 1):
        width = gen.width or default_side
        height = gen.height or default_side
        if not gen.use_resolution_binning and (width % 16 or height % 16):
            raise JobFileError(
                f"[[generation]] #{n}: the model's default size {width}x{height} is not a multiple of 16; set width and height"
            )
        seed = gen.seed
        if seed is None:
            # (fields added later count only when set, so seeds drawn by older versions are found again)
            # (fields added later count only when set, so seeds drawn by older versions are found again;
            # LoRAs never count: adding or rescaling one keeps the entry's seed, so the image is comparable)
            entry_key = canonical_json({k: v for k, v in asdict(gen).items() if k not in ("seed", "loras")
                                        and not (k in ("timesteps", "image", "mask") and v is None)
                                        and not (k == "strength" and gen.image is None)})
            # Equal entries (a prompt repeated in a prompt list) each keep their own seed: the
            # second and later ones are keyed by their rank too.
            seen[entry_key] = seen.get(entry_key, 0) + 1
            if seen[entry_key] > 1:
                entry_key += f"#{seen[entry_key]}"
            seed = previous.get(entry_key)
            if seed is None:
                seed = secrets.randbelow(2**31)  # recorded below, so a rerun reuses it
            drawn[entry_key] = seed
        loras = _resolve_loras(f"[[generation]] #{n}", gen.loras or (), job.source.parent, roots["transformer"], lora_cache)
        for i in range(gen.count):
            index = len(items)
            item_id = f"{index:04d}-{slugify(gen.prompt)}"
            items.append({
                "id": item_id,
                "generation": n,
                "prompt": gen.prompt,
                "negative_prompt": gen.negative_prompt,
                "seed": seed + i,
                "width": width,
                "height": height,
                "guidance_scale": gen.guidance_scale,
                # Custom timesteps set the step count, as the pipeline's retrieve_timesteps does.
                "num_inference_steps": len(gen.timesteps) if gen.timesteps else gen.num_inference_steps,
                "use_resolution_binning": gen.use_resolution_binning,
                **({"timesteps": list(gen.timesteps)} if gen.timesteps else {}),
                **({"loras": loras} if loras else {}),
                "image": f"decode/{item_id}.png",
                **img2img_fields(gen, pictures, height, width, transformer_config["sample_size"], pipeline),
            })
    return {
        "format": FORMAT_VERSION,
        "name": job.settings.name,
        "job_file": str(job.source),
        "model": {"given": job.settings.model, "path": str(model_path), "component_hashes": component_hashes(roots),
                  "components": components},
        "pipeline": pipeline,
        "pipeline_source": pipeline_source,
        "scheduler": scheduler_name,
        "dtype": dtype,
        "device": device,
        "clean_caption": job.settings.clean_caption,
        "max_sequence_length": job.settings.max_sequence_length or chosen.max_sequence_length,
        "drawn_seeds": drawn,
        "runtime": runtime or {},
        "items": items,
    }


# A start picture or mask is read whole to hash and check it; 64 MiB holds a 8192 x 8192 PNG.
MAX_PICTURE_BYTES = 64 << 20
PICTURE_FORMATS = ("PNG", "JPEG", "WEBP")


def read_picture(path: Path, what: str) -> tuple[str, tuple[int, int]]:
    """(sha256, (width, height)) of a PNG, JPEG or WebP file, or a one-line JobFileError naming it."""
    import io

    from PIL import Image, UnidentifiedImageError

    from stages.files import sha256_bytes

    fix = "give a PNG, JPEG or WebP file (paths are relative to the job file)"
    shown = repr(str(path))[1:-1]  # one line whatever the name holds
    try:
        data = read_bytes_limited(path, MAX_PICTURE_BYTES, what, fix=fix)
    except FileNotFoundError:
        raise JobFileError(f"{what} {shown} does not exist; {fix}") from None
    except OSError as exc:
        raise JobFileError(f"{what} {shown} cannot be read ({exc.strerror or exc}); {fix}") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in PICTURE_FORMATS:
                raise JobFileError(f"{what} {shown} is a {image.format} file; {fix}")
            image.load()  # decodes it all: a truncated file fails here, not in a stage
            size = image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise JobFileError(f"{what} {shown} is not a readable picture ({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__}); {fix}") from None
    return sha256_bytes(data), size


def img2img_pictures(job: Job, generations: list) -> dict:
    """Every start picture and mask of the job: path -> (absolute path, sha256, (width, height));
    a mask of another size than its image is refused here, before anything runs."""
    pictures: dict = {}
    for n, gen in enumerate(generations, 1):
        for key in ("image", "mask"):
            given = getattr(gen, key)
            if given is not None and given not in pictures:
                path = (job.source.parent / Path(given).expanduser()).resolve()
                pictures[given] = (path, *read_picture(path, f"[[generation]] #{n}: {key}"))
        if gen.mask is not None and pictures[gen.mask][2] != pictures[gen.image][2]:
            (mw, mh), (iw, ih) = pictures[gen.mask][2], pictures[gen.image][2]
            raise JobFileError(f"[[generation]] #{n}: mask {gen.mask!r} is {mw}x{mh} but image {gen.image!r} is {iw}x{ih}; "
                               f"give a mask of the image's size")
    return pictures


def img2img_fields(gen: GenerationParams, pictures: dict, height: int, width: int, sample_size: int, pipeline: str) -> dict:
    """The resolved item's img2img keys (none for text-to-image): the picture's path and hash, the
    size it is encoded at (the binned size when binning is on, as the latents), and the strength."""
    if gen.image is None:
        return {}
    if gen.use_resolution_binning:
        try:
            height, width = family.binned_size(pipeline, sample_size, height, width)
        except ValueError as exc:
            raise JobFileError(f"{exc}; set use_resolution_binning = false in the job file") from None
    path, digest, _ = pictures[gen.image]
    out = {"init_image": str(path), "init_image_sha256": digest, "strength": gen.strength,
           "image_size": {"height": height, "width": width}}
    if gen.mask is not None:
        path, digest, _ = pictures[gen.mask]
        out.update(mask_image=str(path), mask_image_sha256=digest)
    return out


def _resolve_loras(where: str, loras: tuple, base: Path, transformer_root: Path, cache: dict) -> list[dict]:
    """Each LoRA located (a file or folder relative to the job file, else a hub id) and checked
    against the transformer from headers and configs (stages/lora.py), before anything loads."""
    from stages import lora

    out = []
    for given, scale in loras:
        if given not in cache:
            candidate = (base / Path(given).expanduser()).resolve()
            hub = not candidate.exists() and given.count("/") == 1 and not given.startswith((".", "/", "~"))
            if hub:
                candidate = _download(given, candidate, "LoRA", ["*.safetensors", "*.json"], f"'path' in loras of {where}")
                if not (candidate / lora.PEFT_CONFIG).exists():  # a hub repo of one single-file LoRA
                    files = sorted(candidate.glob("*.safetensors"))
                    if len(files) != 1:
                        raise JobFileError(f"{where}: LoRA {given!r} holds {len(files)} .safetensors files and no {lora.PEFT_CONFIG}; "
                                           f"download it and name the file in 'path'")
                    candidate = files[0]
            if "model" not in cache:
                cache["model"] = lora.meta_transformer(transformer_root / "transformer" / "config.json")
            cache[given] = {"given": given, "path": str(candidate), **({"hub": True} if hub else {}), **lora.inspect_lora(candidate, cache["model"])}
        found = cache[given]
        if any(other["sha256"] == found["sha256"] for other in out):
            raise JobFileError(f"{where}: LoRA {given!r} is listed twice (same content); list it once with the scale you want")
        out.append({**{k: found[k] for k in ("given", "path", "format", "sha256", "bytes", "parameters", "hub") if k in found}, "scale": scale})
    return out


_TRANSFORMER_CLASSES = ("Transformer2DModel", "PixArtTransformer2DModel")


def _check_pixart(given: str, model_path: Path, model_index: dict, transformer_config: dict, transformer_root: Path,
                  pipeline_key: str | None) -> None:
    """A one-line error, before anything loads, when the folder is another kind of pipeline."""
    named = model_index.get("_class_name")
    if named not in family.FAMILIES and not pipeline_key:
        raise JobFileError(
            f"model {given!r}: {model_path}/model_index.json names {named!r}, not a PixArt pipeline "
            f"({', '.join(family.FAMILIES)}); use a PixArt model, or set [job] pipeline if this folder really holds one"
        )
    transformer_class = transformer_config.get("_class_name")
    if transformer_class not in _TRANSFORMER_CLASSES or transformer_config.get("norm_type", "ada_norm_single") != "ada_norm_single":
        raise JobFileError(
            f"model {given!r}: {transformer_root}/transformer/config.json is a {transformer_class!r} "
            f"(norm_type {transformer_config.get('norm_type')!r}), not a PixArt transformer (PixArtTransformer2DModel, ada_norm_single)"
        )


# The schedulers PixArt models ship with or are commonly run with, by name: a model's own scheduler
# among them is accepted without importing diffusers (seconds, in every `status`). Each passes
# _drives_pixart, which tests/test_hostile_inputs.py checks; any other name, and any [job]
# scheduler override, is judged by _drives_pixart and built from the model's config up front.
COMMON_SCHEDULERS = frozenset({
    "DDIMScheduler", "DDPMScheduler", "DEISMultistepScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
    "EulerAncestralDiscreteScheduler", "EulerDiscreteScheduler", "HeunDiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
    "KDPM2DiscreteScheduler", "LCMScheduler", "PNDMScheduler", "TCDScheduler", "UniPCMultistepScheduler",
})


def _drives_pixart(cls) -> bool:
    """Whether a diffusers class can drive PixArt's denoising loop (stages/denoise.py): a
    SchedulerMixin with set_timesteps, step, add_noise and scale_model_input, configured as a
    discrete-time schedule over the DDPM betas PixArt was trained with (num_train_timesteps,
    beta_schedule, prediction_type: epsilon or v-prediction), whose step takes (model output,
    timestep, sample) and nothing else required, and not an inversion (which runs time backwards). Flow matching (FlowMatch*: sigmas, no betas), VQ-Diffusion, score-SDE and
    non-scheduler classes fail it."""
    import inspect

    from diffusers import SchedulerMixin

    if not isinstance(cls, type) or not issubclass(cls, SchedulerMixin) or "Inverse" in cls.__name__:
        return False
    if not all(callable(getattr(cls, method, None)) for method in ("set_timesteps", "step", "add_noise", "scale_model_input")):
        return False
    # denoise calls step(noise_pred, t, latents, ...): nothing else may be required (CogVideoX's DPM wants two more).
    required = [p for p in list(inspect.signature(cls.step).parameters.values())[1:] if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if len(required) != 3:
        return False
    return {"num_train_timesteps", "beta_schedule", "prediction_type"} <= set(inspect.signature(cls.__init__).parameters)


def _diffusers_class(module, name: str):
    """diffusers' class `name`, or None (also for placeholders of classes that need extras, e.g.
    torchsde, which raise ImportError when touched)."""
    if not name.isidentifier() or name.startswith("_"):
        return None
    try:
        cls = getattr(module, name, None)
        return cls if isinstance(cls, type) else None
    except Exception:
        return None


def scheduler_choices() -> list[str]:
    """The diffusers scheduler classes that can drive PixArt here (_drives_pixart), by name."""
    import diffusers

    return sorted(n for n in dir(diffusers) if n.endswith("Scheduler") and _drives_pixart(_diffusers_class(diffusers, n)))


def _check_scheduler(job: Job, root: Path) -> str | None:
    """The [job] scheduler override (None: the model's own), checked with the model's own before
    any stage runs (issue 17, point 7): the class must drive PixArt's loop (_drives_pixart), and
    every generation with custom timesteps needs a set_timesteps that takes them (the pipeline's
    retrieve_timesteps raises otherwise)."""
    config = _read_json(root / "scheduler" / "scheduler_config.json")
    name = str(job.settings.scheduler or config.get("_class_name"))
    if not job.settings.scheduler and name in COMMON_SCHEDULERS and not any(gen.timesteps for gen in job.generations):
        return None
    import inspect

    import diffusers

    cls = _diffusers_class(diffusers, name)
    if not _drives_pixart(cls):
        choices = scheduler_choices()
        where = "[job] 'scheduler'" if job.settings.scheduler else f"{root}/scheduler/scheduler_config.json '_class_name'"
        from diffusers import SchedulerMixin

        if cls is None:
            found = "not a diffusers scheduler class"
        elif type(cls).__name__ == "DummyObject":  # diffusers' placeholder for a class whose extra package is missing
            found = "a diffusers scheduler that needs a package not installed here"
        else:
            kind = "scheduler of another family (flow matching, VQ, score-SDE or inversion)" if issubclass(cls, SchedulerMixin) else "model or pipeline"
            found = f"a diffusers {kind} class, which cannot drive PixArt's denoising loop"
        close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
        raise JobFileError(f"{where}: {_shown(name)!r} is {found}{f'; did you mean {close[0]!r}?' if close else ''}; "
                           f"use a discrete-time scheduler over DDPM betas: {', '.join(choices)}")
    try:  # as denoise builds it: an override from the model's config, which may not suit it (SASolver, UnCLIP)
        cls.from_config(config)
    except Exception as exc:
        where = "[job] 'scheduler'" if job.settings.scheduler else f"{root}/scheduler/scheduler_config.json '_class_name'"
        reason = " ".join(str(exc).split())[:300] or "no reason given"
        raise JobFileError(f"{where}: {name} cannot be built from the model's scheduler config {root}/scheduler/scheduler_config.json "
                           f"({type(exc).__name__}: {reason}); choose another scheduler") from None
    takes_timesteps = "timesteps" in inspect.signature(cls.set_timesteps).parameters
    for n, gen in enumerate(job.generations, 1):
        if gen.timesteps and not takes_timesteps:
            raise JobFileError(f"[[generation]] #{n}: 'timesteps' needs a scheduler whose set_timesteps takes custom timesteps, and "
                               f"{name} does not; remove 'timesteps' or set [job] scheduler = \"DDPMScheduler\" (or another that does)")
    return job.settings.scheduler


def _previous_seeds(job_dir: Path) -> dict:
    """Seeds drawn by an earlier run of this job, keyed by the generation entry they belong to."""
    from stages.artifacts import read_json

    try:  # missing, or damaged (never opened when not a regular file: a FIFO would block the read)
        return read_json(job_dir / "job.resolved.json", MAX_TEXT_BYTES).get("drawn_seeds", {})
    except (OSError, ValueError, AttributeError):
        return {}


def job_dir_for(job: Job, workdir: Path) -> Path:
    """<workdir>/<name>. A folder there whose name differs only in case is refused: on Windows and
    macOS (case-insensitive) both names are one folder, on Linux two, so a copy would mix jobs."""
    workdir, name = Path(workdir).resolve(), job.settings.name
    try:
        others = [p.name for p in workdir.iterdir() if p.name != name and p.name.lower() == name.lower()]
    except OSError:
        others = []
    if others:
        raise JobFileError(f"job name {name!r} differs only in case from the job folder {others[0]!r} in {workdir}; "
                           f"set [job] name = {others[0]!r} to use that job, or choose another name")
    return workdir / name

