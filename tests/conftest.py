"""Shared fixtures: GPU-only tests skip off a GPU; the PyTorch-only environment for parity checks.

The torch environment (Python 3.11 with torch and transformers, no JAX) is built once into
`.venv-torch/` at the repository root (git-ignored) by the first test that needs it; an fcntl lock
keeps pytest-xdist workers from building it twice, and a marker file holding the pinned requirements
says the build finished (a changed pin rebuilds it). torch's CPU wheel comes from the machine's
local wheel directory through pip's own configuration. Each worker starts one torch process for all
its checks: importing torch and transformers costs more than most checks do.

One persistent XLA compilation cache serves the whole run: the controller makes it before the
xdist workers start, and they and every subprocess (CLI runs, 8-device scripts) inherit it through
the environment. Most of the suite's time is compiling tiny programs, and many are compiled again
and again (a resumed run's train step, the same model in several checks). Each run starts cold.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import pytest


# Every compile is cached, however small or quick: the suite's programs are all tiny.
_CACHE_OPTIONS = {"jax_persistent_cache_min_compile_time_secs": 0.0, "jax_persistent_cache_min_entry_size_bytes": 0}


# Most of a CPU compile is LLVM optimising machine code, for programs that then run a few steps:
# unoptimised code compiles ~25% faster. It runs up to ~20% slower (40 steps of the Seer distillation
# model: 35 -> 42 CPU-s), which only the longest training runs feel; the suite gains on balance
# (tests/sparse/test_nsa_training.py: 65 -> 55 CPU-s, the same losses). The HLO, and so what the
# tests check, is the same; XLA's CPU backend does no fast-math at any level.
CPU_XLA_FLAG = "--xla_backend_optimization_level=0"


def add_xla_flag(flag: str) -> None:
    """Append flag to XLA_FLAGS (read when JAX starts its backend; subprocesses inherit it)."""
    if flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()


def pytest_configure(config):
    add_xla_flag(CPU_XLA_FLAG)
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:   # a worker, or a caller who chose the cache
        return
    config._jax_cache = tempfile.mkdtemp(prefix="sparsetrain-jax-cache-")
    options = {**_CACHE_OPTIONS, "jax_compilation_cache_dir": config._jax_cache}
    os.environ.update({name.upper(): str(value) for name, value in options.items()})
    for name, value in options.items():   # this process imported JAX before the environment said so
        jax.config.update(name, value)


def pytest_unconfigure(config):
    if getattr(config, "_jax_cache", None):
        shutil.rmtree(config._jax_cache, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() != "gpu":
        skip = pytest.mark.skip(reason="needs a GPU (run through the device machine)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


ROOT = Path(__file__).resolve().parents[1]
TORCH_VENV = ROOT / ".venv-torch"
REQUIREMENTS = ["torch==2.13.0", "transformers==5.17.0", "safetensors", "numpy"]
SCRIPT = ROOT / "tests" / "export" / "torch_checks.py"
RESULT_MARKER = "torch_checks result: "   # the line torch_checks.py prints its JSON on


def _build(venv: Path) -> None:
    python311 = shutil.which("python3.11")
    if python311 is None:
        pytest.fail("the PyTorch parity tests need python3.11 on PATH to build .venv-torch")
    if not (venv / "bin" / "python").exists():
        subprocess.run([python311, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *REQUIREMENTS], check=True)


@pytest.fixture(scope="session")
def torch_python() -> Path:
    """Path of the torch environment's python, building the environment on first use."""
    marker = TORCH_VENV / ".sparsetrain-requirements"
    TORCH_VENV.mkdir(exist_ok=True)   # `python -m venv` accepts an existing directory
    with open(TORCH_VENV / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not marker.exists() or marker.read_text() != " ".join(REQUIREMENTS):
            _build(TORCH_VENV)
            marker.write_text(" ".join(REQUIREMENTS))
    return TORCH_VENV / "bin" / "python"


class TorchChecks:
    """One `torch_checks.py serve` process per pytest worker, answering the checks in turn (see serve)."""

    def __init__(self, python: Path, workdir: Path):
        env = {**os.environ, "HF_HOME": str(workdir / "hf_home"), "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
        self.stderr = workdir / "stderr.log"
        with open(self.stderr, "w") as stderr:
            self.process = subprocess.Popen([str(python), str(SCRIPT), "serve"], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)

    def run(self, *args) -> dict:
        """The JSON the check returned; fails the test with the check's output and traceback."""
        if self.process.poll() is not None:
            pytest.fail(f"the torch checks process exited earlier:\n{self.stderr.read_text()[-4000:]}")
        self.process.stdin.write(json.dumps(list(map(str, args))) + "\n")
        self.process.stdin.flush()
        output = []
        watchdog = threading.Timer(600, self.process.kill)   # a hung check fails instead of hanging the run
        watchdog.start()
        try:
            while (line := self.process.stdout.readline()) and not line.startswith(RESULT_MARKER):
                output.append(line)
        finally:
            watchdog.cancel()
        reply = json.loads(line[len(RESULT_MARKER):]) if line else {"error": self.stderr.read_text()[-4000:]}
        if "error" in reply:
            pytest.fail(f"torch check {args[0]} failed:\n{''.join(output)}\n{reply['error']}")
        return reply["result"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


@pytest.fixture(scope="session")
def run_torch(torch_python, tmp_path_factory):
    """run_torch("parity", DIR, ...) -> the JSON the check printed; fails the test with its output."""
    checks = TorchChecks(torch_python, tmp_path_factory.mktemp("torch_checks"))
    yield checks.run
    checks.close()
