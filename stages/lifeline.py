"""A stage process started by the orchestrator never outlives it (issue 11, point 1).

The orchestrator puts its pid in PIXART_ORCHESTRATOR_PID when it starts a stage; importing the
`stages` package (the first thing `python -m stages.X` does, before torch) then binds the process
to that parent: on Linux the kernel sends it SIGKILL when the parent dies (prctl PR_SET_PDEATHSIG),
elsewhere a thread checks the parent every 0.2 s. Whatever kills the orchestrator (SIGKILL, the
OOM killer, a closed terminal), its stages go too, running or waiting, and release their locks and
memory; what they finished is kept and a half-written file is never accepted, as after any kill.
A stage started by hand has no such variable and is unaffected. The variable is removed from the
environment once read, so nothing the stage starts inherits it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

ENV = "PIXART_ORCHESTRATOR_PID"
EXIT_ORPHANED = 130  # as interrupted: nobody is left to read it
PR_SET_PDEATHSIG = 1


def bind_to_parent() -> str | None:
    """Bind this process to the orchestrator named in the environment; returns how ('prctl',
    'watch') or None when there is none to bind to. Exits at once if that parent is already gone."""
    value = os.environ.pop(ENV, None)
    if not value or not value.isdigit():
        return None
    parent = int(value)
    how = "prctl" if _parent_death_signal(signal.SIGKILL) else _watch(parent)
    if os.getppid() != parent:  # it died before the binding took effect
        os._exit(EXIT_ORPHANED)
    return how


def _parent_death_signal(signum: int) -> bool:
    """prctl(PR_SET_PDEATHSIG): the kernel signals us when the thread that started us exits (the
    orchestrator starts stages from its main thread, so: when it exits)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch(parent: int) -> str:
    def watch() -> None:
        while not _stop.wait(0.2):
            if os.getppid() != parent:
                os._exit(EXIT_ORPHANED)

    threading.Thread(target=watch, name="orchestrator-watch", daemon=True).start()
    return "watch"


_stop = threading.Event()
