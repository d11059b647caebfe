"""The words stages and orchestrator share: stage names, file names, exit codes and error classes.

The stage contract lives in a few modules, each owning one concern (none imports torch at module
level, so the orchestrator's `status` stays fast, and none imports from orchestrator/):

- stages/files.py: hashing and atomic writes
- stages/locks.py: exclusive locks on jobs and stages
- stages/resolved.py: the resolved job a stage reads, and where its model components are
- stages/units.py: work units and when one is up to date
- stages/records.py: the record each unit publishes last
- stages/artifacts.py: what a stage accepts as an artifact (regular files, expected tensors)
- stages/measure.py: the memory and seconds a stage measures
- stages/embedding_cache.py: the embeddings encode keeps, only while a later unit needs them
- stages/lora.py: LoRA adapters for denoise's transformer: checked from headers, applied with peft
- stages/entry.py: the stage process itself: arguments, device, logging, errors, interrupts

An item of a stage is up to date when its record exists with the current format version and a
valid checksum, its params equal the current resolved ones, its input hashes equal the upstream
records' output hashes, and every output exists with the recorded hash (STYLE.md, "Up to date").
"""

from __future__ import annotations

FORMAT_VERSION = 1
STAGES = ("encode", "denoise", "decode")
# With img2img (docs/img2img.md) a fourth stage, imagencode (picture -> the VAE posterior), runs
# before denoise. It has units only when some item has an image: a text-only job plans none, never
# starts it and shows nothing of it, so STAGES stays the three every job runs.
ALL_STAGES = ("encode", "imagencode", "denoise", "decode")
RESOLVED_JOB = "job.resolved.json"
TMP_PREFIX = ".tmp-"
# Exit codes shared by stages and orchestrator: 2 is an expected, explained failure (bad input,
# bad artifact); 3 is a resource failure (out of memory, disk full) that keeps finished items.
EXIT_USER_ERROR = 2
EXIT_RESOURCE_ERROR = 3
EXIT_INTERRUPTED = 130


class JobFileError(Exception):
    """The job file or the job's model cannot be used as given."""


class ArtifactError(Exception):
    """An upstream artifact or record is missing, corrupt or does not match."""


class ResourceError(Exception):
    """A stage ran out of memory or disk; finished items are kept."""
