"""The declared dependency floors are the versions CI tests (issue 8, point 3): pyproject.toml's
`>=` floors equal the pins in .ci/floors.txt, which .ci/run installs into a second venv and runs
the whole suite with. A floor raised or lowered in one place only fails here."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_floors_are_the_pinned_floor_versions():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    dependencies = project["dependencies"] + project["optional-dependencies"]["ray"]  # the executor's engine too
    floors = {}
    for requirement in dependencies:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9.]*)", requirement.strip())
        if match:
            floors[match.group(1).lower()] = match.group(2)
    pins = {}
    for line in (ROOT / ".ci" / "floors.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.strip().lower()] = version.strip()
    assert set(pins) == set(floors), (pins, floors)
    for name, floor in floors.items():  # "2.13" is the floor of a pin "2.13.0"
        pinned = pins[name].split("+")[0]
        assert pinned == floor or pinned.startswith(floor + ".") and set(pinned[len(floor) + 1:].split(".")) == {"0"}, (name, floor, pinned)


def test_ci_runs_the_suite_at_the_floors():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "-c .ci/floors.txt -e '.[test,ray]'" in ci and ".venv-floors/bin/python -m pytest" in ci
