"""User-input failures at start-up end in one named `error:` line and exit code 2, before any model
is built, whatever the input: config, data path, empty or mistyped data file, tokenizer file,
--init_from target."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_train(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300, env={"JAX_PLATFORMS": "cpu",
                                                                            "PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize("case", ["missing_path", "empty_file", "token_type", "tokenizer", "init_from",
                                  "config_order"])
def test_bad_inputs_give_one_named_line_and_exit_2(tmp_path, case):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "ids.csv").write_text("1,2,3")
    args = {
        "missing_path": ["data.source=files", f"data.path={tmp_path / 'nothing'}"],
        "empty_file": ["data.source=files", f"data.path={tmp_path / 'empty.txt'}"],
        "token_type": ["data.source=tokens", f"data.path={tmp_path / 'ids.csv'}"],
        "tokenizer": [f"data.tokenizer={tmp_path / 'tok.json'}"],
        "init_from": ["--init_from", tmp_path / "no_run"],
        "config_order": ["data.seq_len=512", "model.nope=1"],
    }[case]
    done = run_train(*args, f"run_dir={tmp_path}")
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert all(line.startswith("error: ") for line in lines) and "Traceback" not in done.stderr, done.stderr
    expected = {"missing_path": "does not exist", "empty_file": "is empty", "token_type": "unsupported token file",
                "tokenizer": "tokenizer file", "init_from": "checkpoint path", "config_order": "model.nope"}[case]
    assert expected in done.stderr
    # Nothing was trained: no run directory was written.
    assert not (tmp_path / "tiny" / "checkpoints").exists()
    assert "data: data:" not in done.stderr


@pytest.mark.parametrize("case", ["no_such_config", "repeated_key", "on_corrupt"])
def test_command_line_mistakes_give_one_named_line_and_exit_2(tmp_path, case):
    args, expected = {
        "no_such_config": (["--config", "nope.py"], "--config nope.py: no such file"),
        "repeated_key": (["data.seq_len=64", "data.seq_len=128"],
                         "data.seq_len is given twice ('data.seq_len=64' and 'data.seq_len=128')"),
        "on_corrupt": (["checkpoint.on_corrupt=ignore"],
                       "checkpoint.on_corrupt='ignore' is not allowed; choose one of 'fallback' | 'fail'"),
    }[case]
    done = run_train(*args, f"run_dir={tmp_path}")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {expected}"), done.stderr


def test_options_and_overrides_go_in_any_order():
    done = run_train("name=x", "--config", "configs/nsa_tiny.py", "data.seq_len=128", "--help")
    assert done.returncode == 0, done.stderr
    assert "fields of configs/nsa_tiny.py" in done.stdout
