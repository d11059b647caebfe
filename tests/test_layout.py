"""Guards the layout the house style asks for (issue 11, point 5): the stage contract is split into
modules that each own one concern and say so in their first line; no stage module imports from
orchestrator/ (a stage never reads the TOML or the CLI's flags); and importing the contract pulls in
no torch, so `orchestrate status` stays fast."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONTRACT = ("contract", "files", "locks", "resolved", "units", "records", "artifacts", "measure", "entry")


def test_stages_import_nothing_from_the_orchestrator():
    for source in sorted((ROOT / "stages").glob("*.py")):
        for node in ast.walk(ast.parse(source.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "orchestrator" or n.startswith("orchestrator.") for n in names), f"{source.name}:{node.lineno}"


def test_each_contract_module_says_what_it_owns_in_one_line():
    listed = ast.get_docstring(ast.parse((ROOT / "stages" / "contract.py").read_text()))
    for name in CONTRACT:
        doc = ast.get_docstring(ast.parse((ROOT / "stages" / f"{name}.py").read_text()))
        assert doc and doc.splitlines()[0].endswith("."), name
        if name != "contract":
            assert f"stages/{name}.py" in listed, f"stages/contract.py does not list {name}"


def test_the_contract_imports_no_torch():
    code = f"import sys; import {', '.join('stages.' + n for n in CONTRACT)}; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == "[]"


def test_the_orchestrator_has_a_folder_per_concern():
    """The orchestrator's modules live in folders named for what they do (job file, planning,
    executors, views, tools), each with a one-line docstring saying so; only the CLI sits at the top."""
    top = ROOT / "orchestrator"
    assert sorted(p.name for p in top.glob("*.py")) == ["__init__.py", "cli.py"]
    folders = sorted(p.name for p in top.iterdir() if (p / "__init__.py").exists())
    assert folders == ["executors", "jobfile", "planning", "tools", "views"]
    for folder in folders:
        doc = ast.get_docstring(ast.parse((top / folder / "__init__.py").read_text(encoding="utf-8")))
        assert doc and "\n" not in doc, folder
