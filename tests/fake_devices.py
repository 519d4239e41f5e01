"""Run a test script in a subprocess with 8 fake CPU devices (XLA reads the flag before JAX starts)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, *args, timeout: int = 600, env: dict | None = None) -> str:
    """Stdout of `python ROOT/script *args` (with `env` added to the environment); fails with the
    end of stderr if it exits non-zero."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT), **(env or {}))
    run = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr[-4000:]
    return run.stdout
