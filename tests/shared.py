"""A result computed once per test session, also when pytest-xdist spreads its users over workers."""

from __future__ import annotations

import fcntl
import json
import os
from typing import Any, Callable


def once_per_session(tmp_path_factory, name: str, compute: Callable[[Any], Any]) -> Any:
    """compute(directory) -> a JSON-able value, run by the first worker that asks; the others wait on
    an fcntl lock and read its result (the workers' temporary directories share a parent)."""
    base = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        base = base.parent
    result = base / f"{name}.json"
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not result.exists():
            work = base / name
            work.mkdir(exist_ok=True)
            result.write_text(json.dumps(compute(work)))
    return json.loads(result.read_text())
