"""Foreign-platform mode (issue 18, point 4): this machine made to fail where Windows would.

Put this folder first on PYTHONPATH with PIXART_FOREIGN_PLATFORM=1 and PYTHONWARNDEFAULTENCODING=1
(as .ci/run does); Python imports it at start-up in the test process and in every stage process
it starts (the runner keeps PYTHONPATH). Then:
- a module of the project (a file under orchestrator/ or stages/) cannot import `fcntl`,
  `resource` or `termios`, which Windows lacks (ImportError, as there); third-party libraries may;
- text I/O in the project without an explicit encoding is an error (EncodingWarning raised): on
  Windows it would use the locale's code page, not UTF-8. Third-party code is left alone.
Without PIXART_FOREIGN_PLATFORM=1 this file does nothing.
"""

from __future__ import annotations

import builtins
import os
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
PROJECT_DIRS = tuple(str(ROOT / name) + os.sep for name in ("orchestrator", "stages"))
MISSING_ON_WINDOWS = frozenset({"fcntl", "resource", "termios"})
# Module names the project's code runs under (`python -m stages.denoise` runs as __main__).
PROJECT_MODULES = r"(orchestrator|stages)(\..*)?|__main__"


def _from_project(globals_: dict | None) -> bool:
    file = (globals_ or {}).get("__file__") or ""
    return os.path.abspath(file).startswith(PROJECT_DIRS)


def install() -> None:
    """The import guard and the encoding errors; idempotent."""
    if getattr(builtins.__import__, "foreign_platform", False):
        return
    real_import = builtins.__import__

    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and name.split(".")[0] in MISSING_ON_WINDOWS and _from_project(globals):
            raise ImportError(f"No module named {name!r} (PIXART_FOREIGN_PLATFORM=1: Windows has none)", name=name)
        return real_import(name, globals, locals, fromlist, level)

    guarded_import.foreign_platform = True
    guarded_import.real_import = real_import  # for tests that simulate macOS, which has `resource`
    builtins.__import__ = guarded_import
    warnings.filterwarnings("error", category=EncodingWarning, module=PROJECT_MODULES)


if os.environ.get("PIXART_FOREIGN_PLATFORM") == "1":
    install()
    if not sys.flags.warn_default_encoding:
        sys.stderr.write("foreign-platform mode: set PYTHONWARNDEFAULTENCODING=1 too, or encoding mistakes go unseen\n")
