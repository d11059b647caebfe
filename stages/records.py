"""Records: the self-checksummed JSON a unit publishes after its outputs, which marks it done."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from stages.artifacts import not_regular, open_regular
from stages.contract import FORMAT_VERSION, ArtifactError
from stages.files import canonical_json, publish_bytes, publish_json, sha256_bytes, sha256_file


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


# The job's state cache (<job_dir>/.state.json): content hashes and unit verdicts keyed by the stat
# of every file they were computed from, so a rerun with nothing to do stats files instead of
# reading and hashing them (issue 21; DVC's state db keeps file hashes keyed the same way). Three
# JSON lines: the job's plan entry (when its last plan found every unit done: which files, and a
# stamp of their stat), then the verdicts, then the file hashes. Each is parsed only when needed:
# a no-op rerun or `status` whose plan entry holds parses the first line alone (docs/state.md).
STATE_FILE = ".state.json"
STATE_VERSION = 4  # bump when a verdict's meaning or the file's layout changes: older caches are dropped
# A file changed again within the file system's mtime granularity (FAT 2 s, HFS+ 1 s, ext4 a few ms)
# could keep its stat: entries whose files changed less than this before the save are kept for
# this process only, never saved ("racily clean" entries, as git handles its index).
RACY_NS = 2_000_000_000
MAX_STATE_BYTES = 1 << 30


def stat_key(path: str):
    """(size, mtime_ns, inode, ctime_ns), or None when missing. A copy, restore or rewrite changes
    one of them; ctime also changes when a rewrite resets the mtime (touch -d), and cannot be set."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns


def stamp_of(keys) -> str:
    """A short digest of the stat keys of the files a verdict was made from: Python's 64-bit hash
    of the tuple of ints (-1 for a missing file), which is the same in every process (PYTHONHASHSEED
    salts only str and bytes) and 15x cheaper than hashing their text; another Python build that
    hashes differently only makes the cache miss."""
    if None in keys:  # hash(None) differs between processes before Python 3.12
        keys = [NO_FILE if key is None else key for key in keys]
    return _hex64(hash(tuple(keys)))


def _chained(stamp: int, key) -> int:
    """`stamp` with one more file's stat key folded in (a plan entry's stamp: keep_plan, plan_done)."""
    return hash((stamp, NO_FILE if key is None else key))


def _hex64(value: int) -> str:
    return format(value & 0xFFFFFFFFFFFFFFFF, "x")


NO_FILE = (-1,)


class RecordReader:
    """A run's reads: each record is read and checked, and each output hashed, at most once per
    run (a run plans again after each stage that made records, and a unit's record is also its
    downstream's input). What it keeps is small (per record its outputs' hashes, per unit its
    verdict), never whole records. Anything is read again when its file's stat changed.

    With `job_dir` (attach), output hashes and unit verdicts also persist across runs in
    <job_dir>/.state.json, each keyed by the stat of the files it came from: a no-op rerun or
    `status` stats ~2 files per unit (each record once, in a snapshot) and reads no record; when
    the job's last plan found every unit done, its plan entry (keep_plan, plan_done) skips even the
    judging. Staleness still compares content hashes
    (STYLE.md): the cache only says which hash a file with that stat had. A missing, damaged or
    other-version cache is rebuilt silently; `orchestrate clean` removes it. docs/state.md says
    what this keeps and what it does not."""

    def __init__(self, job_dir=None) -> None:
        self._outputs: dict[str, tuple] = {}  # record path -> (stat key, ((name, sha256), ...) or None, why)
        self._hashes: dict[str, tuple] = {}  # output path -> (stat key, sha256)
        # unit_status: record path + "|1" (outputs hashed) or "|0" -> "stamp|fingerprint|ok|why",
        # one string as the state file holds it (a 10,000-item job has 30,000)
        self.verdicts: dict[str, str] = {}
        self._verdicts_loaded = True  # False while the attached job's saved verdicts are not parsed yet
        self._racy: dict[str, int] = {}  # verdict key -> the newest mtime/ctime of its files
        self._saved_hashes: dict | None = None  # relative path -> "size mtime inode ctime sha256", once loaded
        self._saved_plan: dict | None = None  # the state file's plan entry, once loaded ({} when none)
        self._new_plan: tuple | None = None  # (entry, newest mtime/ctime of its files) to save
        self.plan_identity: str | None = None  # the plan entry that holds now (keep_plan, plan_done)
        self.job_dir: str | None = None
        self.reads = 0  # records read and parsed by this reader (tests count them)
        self._dirty = False
        self._stats: dict | None = None  # record path -> stat key while a snapshot is open
        self._fold: list | None = None  # while a collecting snapshot is open: [stamp so far, newest mtime/ctime, paths]
        self.last_snapshot: dict = {}
        if job_dir is not None:
            self.attach(job_dir)

    def stat_key(self, path: str):
        """stat_key; a record's is taken once while a snapshot is open (plan_job: a unit's
        upstream record is also its upstream unit's record, so each would be stat'ed twice).
        Outputs are stat'ed once per plan anyway, so only records are kept (a tenth of a plan's
        memory at 10,000 items). A collecting snapshot also folds each file's first stat into
        the plan's stamp (keep_plan)."""
        memo = self._stats
        if memo is None:
            return stat_key(path)
        if path.endswith(".json"):
            key = memo.get(path, memo)
            if key is not memo:
                return key
            key = memo[path] = stat_key(path)
        else:
            key = stat_key(path)
        fold = self._fold
        if fold is not None:
            fold[0] = _chained(fold[0], key)
            fold[2].append(path)
            if key is not None and max(key[1], key[3]) > fold[1]:
                fold[1] = max(key[1], key[3])
        return key

    @contextlib.contextmanager
    def snapshot(self, collect: bool = False):
        """One stat per record for the block's verdicts (a plan judges the job as of one moment).
        Afterwards `last_snapshot` holds those stats (record path -> stat_key), for the caller
        that renders the plan's states right after it (the gallery at the end of a run).
        `collect`: every file's stat is also folded into a stamp, which keep_plan saves."""
        outer, self._stats = self._stats, {} if self._stats is None else self._stats
        if collect and outer is None:
            self._fold = [0, 0, []]
        try:
            yield self
        finally:
            if outer is None:
                self.last_snapshot = self._stats
                self._fold = None
            self._stats = outer

    def attach(self, job_dir) -> None:
        """Use <job_dir>/.state.json; each of its lines is parsed when first needed (a damaged or
        missing file is an empty cache)."""
        job_dir = os.path.abspath(str(job_dir))
        if self.job_dir == job_dir:
            return
        self.job_dir, self._saved_hashes, self._saved_plan, self._verdicts_loaded = job_dir, None, None, False

    def _load_verdicts(self) -> None:
        self._verdicts_loaded = True
        verdicts = self._state_line(1, "verdicts")
        if verdicts is None:
            self._dirty = True  # none, damaged or another version: the next run writes a good one
            return
        root = self.job_dir + os.sep
        for rel, entry in verdicts.items():  # checked when used (verdict): most are never looked at
            self.verdicts.setdefault(root + rel, entry)

    def _state_line(self, number: int, name: str) -> dict | None:
        """Line `number` of the state file: its `name` table when the line is this version's and
        whole. Only the lines up to it are read."""
        try:
            with os.fdopen(open_regular(os.path.join(self.job_dir, STATE_FILE)), "rb") as f:  # regular files only
                for _ in range(number + 1):
                    data = f.readline(MAX_STATE_BYTES + 1)
                    if not data.endswith(b"\n"):  # cut short, or over the limit
                        return None
            line = json.loads(data)
        except (OSError, ValueError, ArtifactError, RecursionError):
            return None
        if not isinstance(line, dict) or line.get("version") != STATE_VERSION or not isinstance(line.get(name), dict):
            return None
        return line[name]

    def _saved_hash(self, path: str):
        """The state file's (stat key, sha256) for `path`, or None; the hashes are read at the first call."""
        if self.job_dir is None or not path.startswith(self.job_dir + os.sep):
            return None
        if self._saved_hashes is None:
            self._saved_hashes = self._state_line(2, "hashes") or {}
        entry = self._saved_hashes.get(path[len(self.job_dir) + 1:])
        try:
            size, mtime, inode, ctime, sha = entry.split(" ")
            return (int(size), int(mtime), int(inode), int(ctime)), sha
        except (AttributeError, ValueError):
            return None  # none, or damaged: hashed again

    def keep_plan(self, key: str, counts: dict[str, int]) -> None:
        """After a collecting snapshot in which every unit of the job planned as `key` was judged
        done: the plan entry (which files were stat'ed, in order, and the stamp of their stats),
        so the next plan of the same job and code can stat them and skip judging (plan_done).
        Saved unless one of those files changed within RACY_NS of the save."""
        stamp, newest, paths = self._fold
        self.plan_identity = None
        root = self.job_dir + os.sep if self.job_dir else None
        if root is None or not all(path.startswith(root) for path in paths):
            return
        stamp = _hex64(stamp)
        entry = {"key": key, "stamp": stamp, "counts": counts, "files": "\n".join(path[len(root):] for path in paths)}
        import time

        self.plan_identity = f"{key}|{stamp}" if newest < time.time_ns() - RACY_NS else None
        saved = self._saved_plan or {}
        if (saved.get("key"), saved.get("stamp")) != (key, stamp):
            self._new_plan, self._dirty = (entry, newest), True

    def plan_done(self, key: str) -> dict[str, int] | None:
        """Each stage's unit count when the state file's plan entry is for `key` (the same job and
        code) and every file it lists has the stat it had then: every unit is done, as judged
        then. Else None, and the job is judged unit by unit."""
        self.plan_identity = None
        if self._saved_plan is None:
            self._saved_plan = self._state_line(0, "plan") or {}
        entry = self._saved_plan
        if entry.get("key") != key or not isinstance(entry.get("files"), str) or not isinstance(entry.get("counts"), dict):
            return None
        counts = entry["counts"]
        if not all(type(n) is int and n >= 0 for n in counts.values()):
            return None
        root = self.job_dir + os.sep
        stamp = 0
        for rel in entry["files"].split("\n"):
            stamp = _chained(stamp, stat_key(root + rel))
        stamp = _hex64(stamp)
        if stamp != entry.get("stamp"):
            return None
        self.plan_identity = f"{key}|{stamp}"
        return counts

    def save(self) -> None:
        """Write the state cache atomically when it learned something; entries of files changed
        within RACY_NS of now stay out. Never fails the command: it is only a cache."""
        if self.job_dir is None or not self._dirty:
            return
        import time

        root = self.job_dir + os.sep
        recent = time.time_ns() - RACY_NS
        if self._saved_hashes is None:
            self._saved_hashes = self._state_line(2, "hashes") or {}
        if not self._verdicts_loaded:
            self._load_verdicts()
        # What this run did not look at stays as it was, when well formed.
        hashes = {rel: v for rel, v in self._saved_hashes.items() if isinstance(v, str) and v.count(" ") == 4}
        hashes.update((path[len(root):], f"{key[0]} {key[1]} {key[2]} {key[3]} {sha}") for path, (key, sha) in self._hashes.items()
                      if path.startswith(root) and key[1] < recent and key[3] < recent)
        racy = {key for key, changed in self._racy.items() if changed >= recent}
        verdicts = {path[len(root):]: v for path, v in self.verdicts.items()
                    if path.startswith(root) and isinstance(v, str) and path not in racy}
        # Only the newest plan's entry: an older one no longer holds (a stage ran, or the job changed).
        plan = self._new_plan[0] if self._new_plan is not None and self._new_plan[1] < recent else {}
        lines = [{"version": STATE_VERSION, "plan": plan}, {"version": STATE_VERSION, "verdicts": verdicts},
                 {"version": STATE_VERSION, "hashes": hashes}]
        try:  # JSON never holds a raw newline: one line each
            publish_bytes(Path(root, STATE_FILE), "\n".join(json.dumps(line, separators=(",", ":")) for line in lines).encode() + b"\n")
            self._dirty = False
            self._saved_plan = plan
        except (OSError, ArtifactError):
            pass

    def verdict(self, key: str, stamp: str, fingerprint: str):
        """(ok, why) kept for unit `key` made from files with this `stamp`, or None."""
        if not self._verdicts_loaded:
            self._load_verdicts()
        kept = self.verdicts.get(key)
        if kept is None:
            return None
        prefix = f"{stamp}|{fingerprint}|"
        # A damaged entry of the state file (not this shape) is judged again, and replaced.
        if type(kept) is str and kept.startswith(prefix) and kept[len(prefix):len(prefix) + 2] in ("1|", "0|"):
            return kept[len(prefix)] == "1", kept[len(prefix) + 2:]
        return None

    def keep_verdict(self, key: str, stamp: str, fingerprint: str, verdict: tuple, changed_ns: int = 0) -> None:
        """Remember a verdict; `changed_ns`, the newest mtime or ctime of its files, keeps a racily
        clean one out of the saved cache (it holds for this process only)."""
        ok, why = verdict
        self.verdicts[key] = f"{stamp}|{fingerprint}|{1 if ok else 0}|{why}"
        self._racy[key] = changed_ns
        self._dirty = True

    def read(self, path) -> tuple[dict | None, str]:
        """read_record's answer (a fresh read), remembering the outputs' hashes it lists."""
        path = str(path)
        key = stat_key(path)
        record, why = read_record(path)
        self.reads += 1
        if key is not None:
            outputs = None if record is None else tuple((name, meta.get("sha256")) for name, meta in (record.get("outputs") or {}).items())
            self._outputs[path] = (key, outputs, why)
        return record, why

    def outputs(self, path) -> tuple[dict | None, str]:
        """The record cut to its outputs' hashes ({"outputs": {name: {"sha256": ...}}}, "") or
        (None, why it is not usable); read only when not yet read in this run, or changed since."""
        path = str(path)
        kept = self._outputs.get(path)
        if kept is None or kept[0] != stat_key(path):
            record, why = self.read(path)
            kept = self._outputs.get(path) or (None, None, why)
        return (None if kept[1] is None else {"outputs": {name: {"sha256": sha} for name, sha in kept[1]}}), kept[2]

    def sha256(self, path) -> str | None:
        """The file's content hash, None when it is missing."""
        path = str(path)
        key = stat_key(path)
        if key is None:
            return None
        kept = self._hashes.get(path)
        if kept is None:
            kept = self._saved_hash(path)
        if kept is None or kept[0] != key:
            try:
                kept = self._hashes[path] = (key, sha256_file(path))
            except FileNotFoundError:
                return None
            self._dirty = True
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
