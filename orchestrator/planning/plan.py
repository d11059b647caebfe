"""What is stale and why: per item and stage, predicted before anything runs.

The per-unit test is `stages.units.unit_status`, the same function each stage uses to pick its
work. Here it is applied to all stages at once, and a unit whose upstream will rerun is reported
stale because of it (the stage itself re-checks against the real upstream records when it runs).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from stages.contract import ALL_STAGES
from stages.files import canonical_json
from stages.records import RecordReader
from stages.units import Unit, plan_units, unit_status


class UnitState(NamedTuple):
    """A unit's predicted state (a named tuple: 30,000 of them per 10,000-item plan, made 4x faster
    than a frozen dataclass's)."""

    unit: Unit
    state: str  # "done", "to do" (never made) or "stale" (made, but out of date)
    reason: str


class Plan(dict):
    """plan_job's result: stage -> its units' states, in job order. `identity` names the job, the
    code and the stat of every file its verdicts came from, when every unit is done and none of
    those files changed within the last RACY_NS (the gallery keeps its data files for an equal one)."""

    identity: str | None = None


class DoneStates(Sequence):
    """A stage's states when the job's plan entry held (stages/records.py, plan_done): every unit
    done. Its length needs no planning; its UnitStates are made on demand (plan_units, once for all
    stages) for a caller that needs the units themselves (--force, a gallery remade)."""

    all_done = True

    def __init__(self, stage: str, count: int, units_of) -> None:
        self.stage, self.count, self._units_of = stage, count, units_of

    def __len__(self) -> int:
        return self.count

    def _states(self) -> list[UnitState]:
        return [UnitState(unit, "done", "up to date") for unit in self._units_of()[self.stage]]

    def __getitem__(self, index):
        return self._states()[index]

    def __iter__(self):
        return iter(self._states())


def units_once(job: dict):
    """plan_units(job), made at the first call and kept (a run plans several times, and not at all
    when the job's plan entry holds)."""
    return functools.cache(lambda: plan_units(job))


def todo_states(states) -> list[UnitState]:
    """The states of units that are not done (none, without planning, for DoneStates)."""
    return [] if getattr(states, "all_done", False) else [s for s in states if s.state != "done"]


# The code a plan's verdicts follow (what makes the units and judges them): a job's plan entry holds
# under the same code only, so an upgrade that changes a unit's params is judged unit by unit.
_CODE = ("stages.units", "stages.records", "stages.artifacts", "stages.files", "stages.resolved", "stages.contract", __name__)


@functools.cache
def _code_identity() -> bytes | None:
    digest = hashlib.blake2b(digest_size=16)
    try:
        for name in _CODE:
            with open(importlib.import_module(name).__file__, "rb") as f:
                digest.update(f.read())
    except (OSError, ImportError, TypeError):  # no source file (a frozen build): no plan entry
        return None
    return digest.digest()


def plan_key(job: dict) -> str | None:
    """What every unit of the job, their params and how they are judged follow from: the resolved
    job (canonical JSON: key order does not matter) and the code. None: no plan entry for it."""
    code = _code_identity()
    try:
        text = canonical_json(job)
    except (TypeError, ValueError):
        return None
    return None if code is None else hashlib.blake2b(code + text.encode(), digest_size=16).hexdigest()


def plan_job(job_dir: Path, job: dict, reader: RecordReader | None = None, units=None) -> Plan:
    """Every unit of every stage with its predicted state and reason. A run passes its own
    `reader` (each record and output read once per run) and `units` (plan_units' result, or
    units_once's function: made once). Verdicts and hashes come from the job's state cache
    (stages/records.py, RecordReader) when their files' stat is unchanged; when the job's last plan
    found every unit done and no file it was judged from changed, the whole plan comes from its
    plan entry (DoneStates; docs/state.md). Only `orchestrate run` saves the cache (under the job
    lock), so `status`, `plan` and `gallery` write nothing."""
    units_of = units if callable(units) else (lambda: units) if units is not None else units_once(job)
    reader = reader if reader is not None else RecordReader()
    reader.attach(job_dir)  # the job's state cache (.state.json): a warm no-op plan stats files, reads no record
    key = plan_key(job)
    counts = reader.plan_done(key) if key is not None else None
    if counts is not None:
        plan = Plan((stage, DoneStates(stage, n, units_of)) for stage, n in counts.items())
        plan.identity = reader.plan_identity
        return plan
    units = units_of()
    pending: set[tuple[str, str]] = set()
    # imagencode only when it has units (img2img): a text-only job's plan is the three stages'.
    with reader.snapshot(collect=key is not None):  # each file stat'ed once: a record is its unit's and its downstream's input
        plan = Plan((stage, _states(job_dir, units[stage], pending, reader)) for stage in ALL_STAGES if units.get(stage) or stage != "imagencode")
        if not pending and key is not None:  # every unit done: the next plan may skip judging
            reader.keep_plan(key, {stage: len(states) for stage, states in plan.items()})
            plan.identity = reader.plan_identity
    return plan


def _states(job_dir: Path, units: list, pending: set, reader: RecordReader) -> list[UnitState]:
    """States of one stage's units; a unit fed by a `pending` (stage, key) is stale because of it.
    Adds this stage's units that are not done to `pending`."""
    states = []
    for unit in units:
        waiting = [f"{up} reruns" for up, key in unit.inputs if (up, key) in pending] if pending else None
        if waiting:
            ok, why = False, ", ".join(waiting)
        else:
            ok, why = unit_status(job_dir, unit, reader=reader)
        if not ok:
            pending.add((unit.stage, unit.key))
        has_record = ok or reader.outputs(os.path.join(job_dir, unit.stage, f"{unit.key}.json"))[0] is not None
        states.append(UnitState(unit, "done" if ok else ("stale" if has_record else "to do"), why))
    return states


def describe_stage(stage: str, states: list[UnitState], limit: int = 8) -> list[str]:
    """`encode: 12 up to date, 3 to do` and one line per unit to make, with its reason."""
    todo = todo_states(states)
    lines = [f"{stage}: {len(states) - len(todo)} up to date, {len(todo)} to do"]
    for s in todo[:limit]:
        # An encode unit is keyed by its text; name the items that use it, so problems read by item.
        items = "" if s.unit.items == (s.unit.key,) else f" (item{'s' if len(s.unit.items) > 1 else ''} {', '.join(s.unit.items)})"
        lines.append(f"  {stage} {s.unit.key}{items}: {s.state} ({s.reason})")
    if len(todo) > limit:
        lines.append(f"  ... and {len(todo) - limit} more")
    return lines
