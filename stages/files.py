"""Hashing and atomic writes: a reader sees the old file, the whole new one, or none."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import stat
import sys
import time
from pathlib import Path

from stages.contract import TMP_PREFIX, JobFileError, ResourceError


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """Content hash of a regular file, read in 1 MiB chunks; ArtifactError for anything else (a
    FIFO would block the read forever, a link could point anywhere: stages/artifacts.py)."""
    from stages.artifacts import open_regular

    digest = hashlib.sha256()
    with os.fdopen(open_regular(path), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def canonical_json(obj) -> str:
    """Stable JSON text: sorted keys, no spaces; what params and checksums are computed over."""
    return _CANONICAL.encode(obj)


# json.dumps with these options builds a new encoder per call: a third of the cost of a key.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def short_hash(obj) -> str:
    return sha256_bytes(canonical_json(obj).encode())[:16]


# Size limits of the text the project reads itself (issue 17, point 8): a 2 GB sparse prompt list or
# a config linked to /dev/zero must be a one-line refusal, not a MemoryError. The largest real
# config (T5-XXL's safetensors index) is ~20 KB; a 64 MiB prompt list is ~500,000 prompts.
MAX_CONFIG_BYTES = 1 << 20
MAX_TEXT_BYTES = 64 << 20

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _shown(path) -> str:
    """A path as it can be printed on one line (escapes newlines and the like)."""
    return repr(str(path))[1:-1]


def _not_regular(mode: int) -> str | None:
    return None if stat.S_ISREG(mode) else next((kind for test, kind in _KINDS if test(mode)), "not a regular file")


def read_bytes_limited(path: Path, limit: int, what: str, error=JobFileError, fix: str = "replace it with the real file") -> bytes:
    """The bytes of a regular file of at most `limit` bytes, else `error` naming `what`, the path
    and the fix. Checked with stat before opening (opening a FIFO blocks until a writer comes),
    opened non-blocking and checked again (the entry may be swapped in between), and read to at
    most limit + 1 bytes (a sparse file or a link to /dev/zero never fills memory).
    FileNotFoundError passes through: callers say what a missing file means."""
    path = Path(path)
    shown = _shown(path)
    kind = _not_regular(os.stat(path).st_mode)  # follows links: a link to /dev/zero is a device
    if kind is None:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            info = os.fstat(fd)
            kind = _not_regular(info.st_mode)
            if kind is None and info.st_size <= limit:
                with os.fdopen(os.dup(fd), "rb") as f:
                    data = f.read(limit + 1)
                if len(data) <= limit:
                    return data
        finally:
            os.close(fd)
        if kind is None:
            raise error(f"{what} {shown} is over {limit / (1 << 20):g} MiB ({os.stat(path).st_size:,} bytes), more than such a file can be; {fix}")
    raise error(f"{what} {shown} is {kind}, not a regular file; {fix}")


def read_text_limited(path: Path, limit: int, what: str, error=JobFileError, fix: str = "replace it with the real file") -> str:
    """read_bytes_limited, as UTF-8 text (a byte-order mark is dropped)."""
    data = read_bytes_limited(path, limit, what, error, fix)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"{what} {_shown(path)} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); {fix}") from None


def read_json_limited(path: Path, what: str, limit: int = MAX_CONFIG_BYTES, error=JobFileError, fix: str = "replace it with the real file"):
    """read_text_limited, parsed as JSON; a parse error is `error` naming the file too."""
    text = read_text_limited(path, limit, what, error, fix)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{what} {_shown(path)} is not valid JSON ({exc}); {fix}") from None


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX). Windows cannot open a folder as a file and has no need to;
    some filesystems (network, FUSE) refuse a folder fsync: the rename still happened."""
    if sys.platform == "win32":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except (PermissionError, IsADirectoryError):
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.EACCES, errno.EPERM, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    """Flush a file just written (by safetensors, PIL or us) to disk, through a handle opened for
    writing: Windows' FlushFileBuffers refuses a read-only one (and every publish would fail)."""
    fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Windows refuses to replace a file another process has open (a viewer, an antivirus scan, a
# stage reading it): PermissionError until it lets go, usually within milliseconds.
REPLACE_RETRY_DELAYS_S = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6)


def replace_file(source: Path, target: Path) -> None:
    """os.replace, retried with backoff on Windows while another process holds `target`."""
    for delay in (*REPLACE_RETRY_DELAYS_S, None):
        try:
            os.replace(source, target)
            return
        except PermissionError:
            if sys.platform != "win32" or delay is None:
                raise
            time.sleep(delay)


def publish(path: Path, write) -> None:
    """Write `path` atomically: `write(tmp_path)` fills a temporary file in the same folder, which
    is flushed to disk and renamed into place. On any failure the temporary file is removed, so a
    reader sees either the old file, the complete new one, or none."""
    path = Path(path)
    if os.path.isdir(path) and not os.path.islink(path):  # a rename cannot replace it: say so, exit 2 (not "disk full")
        from stages.contract import ArtifactError

        raise ArtifactError(f"{path} is a folder where a file belongs; remove it (e.g. `rm -r {path}`), then run again")
    tmp = path.with_name(f"{TMP_PREFIX}{os.getpid()}-{path.name}")
    replacing = False
    try:
        write(tmp)
        _fsync_file(tmp)
        replacing = True
        replace_file(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if replacing and isinstance(exc, PermissionError) and sys.platform == "win32":
            raise ResourceError(f"could not replace {path}: another program keeps it open (an image viewer, an antivirus "
                                f"scan?); close it, then run again") from exc
        reason = _write_error_reason(exc)
        if reason:
            raise ResourceError(f"could not write {path}: {reason}; free disk space or fix the folder, then run again") from exc
        raise


def _write_error_reason(exc: BaseException) -> str | None:
    """What the OS said when a write failed, or None for other errors. safetensors' Rust writer
    reports a full disk as SafetensorError("... I/O error: No space left on device (os error 28)")."""
    if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
        return exc.strerror or str(exc)
    match = re.search(r"I/O error: (.+)|IoError\((.+)\)", str(exc)) if type(exc).__name__ == "SafetensorError" else None
    return (match.group(1) or match.group(2)) if match else None


def safetensors_metadata(stage: str, key: str) -> dict:
    """ONE str->str entry: safetensors keeps metadata in a hash map whose order varies between
    processes, so two keys would make byte-different files (and hashes) for equal tensors."""
    return {"artifact": f"{stage}/{key}"}


def publish_bytes(path: Path, data: bytes) -> None:
    publish(path, lambda tmp: Path(tmp).write_bytes(data))


def publish_json(path: Path, obj) -> None:
    publish_bytes(path, (json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def remove_temp_files(directory: Path, keys=None) -> list[Path]:
    """Delete half-written files left by an interrupted writer (call under the stage lock). With
    `keys` (a shard's units), only the temporary files of those units' artifacts and records
    (`.tmp-<pid>-<key>.<ext>`): shards of one stage run side by side, each writing its own."""
    removed = []
    for tmp in Path(directory).glob(f"{TMP_PREFIX}*"):
        target = re.sub(r"^\d+-", "", tmp.name[len(TMP_PREFIX):])  # publish names it .tmp-<pid>-<name>
        if keys is not None and target.rsplit(".", 1)[0] not in keys:
            continue
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed.append(tmp)
    return removed


def shown_path(path) -> str:
    """`path` relative to the current folder when it can be, else absolute (on Windows,
    os.path.relpath raises ValueError across drives, e.g. a job on D: run from C:)."""
    try:
        return os.path.relpath(path)
    except ValueError:
        return os.path.abspath(path)
