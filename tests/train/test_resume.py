"""Exact resume, SIGTERM, kill -9 during an async save, freezing and the non-finite policy."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grain
import jax
import numpy as np
import pytest

from sparsetrain.train import NonFiniteError, Trainer, train
from sparsetrain.train.checkpoint import Checkpointer
from sparsetrain.checkpoint.model_def import flatten
from tests.train.helpers import SMALL, read_metrics, small_config

ROOT = Path(__file__).resolve().parents[2]
# A constant schedule makes "train N then resume to 2N" the same optimisation as "train 2N".
SAME_SCHEDULE = ("optimizer.schedule=constant", "optimizer.warmup_steps=2", "trainer.eval_every=1000")


def losses(run_dir):
    return {m["step"]: m["loss"] for m in read_metrics(run_dir) if "loss" in m}


def final_params(cfg):
    return {k: np.asarray(v) for k, v in flatten(Trainer(cfg).state["params"]).items()}


def assert_same_params(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def launch(run_dir, *overrides):
    # The command line takes each key once: later overrides replace SMALL's, as small_config's do.
    given = {o.split("=", 1)[0]: o for o in [*SMALL, f"run_dir={run_dir}", *SAME_SCHEDULE, *overrides]}
    args = list(given.values())
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc, timeout=300):
    start = time.time()
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() - start < timeout, "timed out"
        time.sleep(0.05)


def test_resume_after_normal_end_is_bitwise_identical(tmp_path):
    straight = small_config(tmp_path, "trainer.steps=8", "name=straight", *SAME_SCHEDULE)
    train(straight)
    train(small_config(tmp_path, "trainer.steps=4", "name=split", *SAME_SCHEDULE))
    train(small_config(tmp_path, "trainer.steps=8", "name=split", *SAME_SCHEDULE))
    assert losses(tmp_path / "split") == losses(tmp_path / "straight")
    assert_same_params(final_params(straight),
                       final_params(small_config(tmp_path, "trainer.steps=8", "name=split", *SAME_SCHEDULE)))


def interrupted(run_dir, sig, after_rows):
    """Launch an endless run, send `sig` once metrics.jsonl has `after_rows` rows; (process, its output)."""
    proc = launch(run_dir.parent, f"name={run_dir.name}", "trainer.steps=10000")
    wait_for(lambda: (run_dir / "metrics.jsonl").exists()
             and len((run_dir / "metrics.jsonl").read_text().splitlines()) >= after_rows, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    return proc, out + err


def test_sigterm_saves_and_resume_matches_straight_run(tmp_path):
    proc, output = interrupted(tmp_path / "term", signal.SIGTERM, after_rows=3)
    assert proc.returncode == 143, output[-3000:]   # 128 + SIGTERM, after the checkpoint is saved
    assert "received signal" in output
    stopped = Checkpointer(tmp_path / "term", small_config(tmp_path).checkpoint).latest_step()
    assert stopped is not None and stopped >= 3
    end = stopped + 3
    train(small_config(tmp_path, f"trainer.steps={end}", "name=term", *SAME_SCHEDULE))
    straight = small_config(tmp_path, f"trainer.steps={end}", "name=straight", *SAME_SCHEDULE)
    train(straight)
    assert losses(tmp_path / "term") == losses(tmp_path / "straight")
    assert_same_params(final_params(straight), final_params(
        small_config(tmp_path, f"trainer.steps={end}", "name=term", *SAME_SCHEDULE)))


def test_sigint_saves_and_exits_130(tmp_path):
    proc, output = interrupted(tmp_path / "int", signal.SIGINT, after_rows=2)
    assert proc.returncode == 130, output[-3000:]   # 128 + SIGINT, as a shell reports Ctrl-C
    logged = max(losses(tmp_path / "int"))
    assert Checkpointer(tmp_path / "int", small_config(tmp_path).checkpoint).latest_step() == logged


def test_a_second_signal_exits_at_once_without_waiting_for_the_main_thread():
    # The main thread blocks in C (a lock that is never released), as in a long compile.
    script = ("import os, signal, threading, time\n"
              "from sparsetrain.train.interrupt import StopRequests\n"
              "with StopRequests(print):\n"
              "    threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()\n"
              "    threading.Timer(0.6, os.kill, (os.getpid(), signal.SIGINT)).start()\n"
              "    lock = threading.Lock(); lock.acquire(); lock.acquire()\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 130, done.stderr
    assert "received signal 2: saving a checkpoint" in done.stdout
    assert "received signal 2 again: exiting now" in done.stderr


def test_kill_during_async_save_keeps_last_complete_checkpoint(tmp_path):
    proc = launch(tmp_path, "name=kill", "trainer.steps=10000", "checkpoint.every=2", "checkpoint.keep=3")
    ckpt_dir = tmp_path / "kill/checkpoints"
    # Kill the moment a save is in flight (orbax writes into a "*tmp*" directory first).
    wait_for(lambda: ckpt_dir.exists() and any("tmp" in p.name for p in ckpt_dir.iterdir())
             and any(p.name.isdigit() for p in ckpt_dir.iterdir()), proc)
    proc.kill()
    proc.wait()
    complete = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
    latest = Checkpointer(tmp_path / "kill", small_config(tmp_path).checkpoint).latest_step()
    assert latest == complete[-1]
    steps_logged = max(losses(tmp_path / "kill"))
    assert steps_logged - latest <= 2 + 1  # lost at most the steps since the last complete save
    summary = train(small_config(tmp_path, f"trainer.steps={latest + 2}", "name=kill", *SAME_SCHEDULE))
    assert summary["step"] == latest + 2 and np.isfinite(summary["loss"])


def test_frozen_parameters_do_not_change(tmp_path):
    cfg = small_config(tmp_path, "trainer.steps=3", "name=frozen", "optimizer.freeze=^embed,layers/0/",
                       "trainer.eval_every=1000")
    trainer = Trainer(cfg)
    before = {k: np.asarray(v) for k, v in flatten(trainer.state["params"]).items()}
    trainer.run()
    after = {k: np.asarray(v) for k, v in flatten(trainer.state["params"]).items()}
    frozen = [k for k in before if k == "embed" or k.startswith("layers/0/")]
    assert frozen and all(np.array_equal(before[k], after[k]) for k in frozen)
    assert not np.array_equal(before["layers/1/attn/q_proj"], after["layers/1/attn/q_proj"])


class _Poisoned(grain.DatasetIterator):
    """Wraps the data iterator: at the given (1-based) steps the loss mask is NaN, so the loss and
    gradient are NaN. Stays a grain iterator so checkpoints still save its position."""

    def __init__(self, inner, steps):
        super().__init__(inner)
        self.inner, self.steps, self.count = inner, steps, 0

    def __next__(self):
        self.count += 1
        batch = next(self.inner)
        if self.count in self.steps:
            batch = dict(batch, loss_mask=np.full_like(batch["loss_mask"], np.nan))
        return batch

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


def test_nonfinite_step_is_skipped(tmp_path, capsys):
    trainer = Trainer(small_config(tmp_path, "trainer.steps=3", "name=skip", "trainer.nonfinite=skip",
                                   "trainer.eval_every=1000"))
    trainer.train_iter = _Poisoned(trainer.train_iter, {2})
    before = {k: np.asarray(v) for k, v in flatten(trainer.state["params"]).items()}
    summary = trainer.run()
    captured = capsys.readouterr()
    assert "step 2: non-finite loss/gradient" in captured.out + captured.err
    assert summary["step"] == 3 and np.isfinite(summary["loss"])
    # Steps 1 and 3 still trained (test_skipped_update_leaves_state_untouched checks step 2 itself).
    assert any(not np.array_equal(before[k], np.asarray(v))
               for k, v in flatten(trainer.state["params"]).items())


def test_nonfinite_policy_stop_raises_with_the_step(tmp_path):
    trainer = Trainer(small_config(tmp_path, "trainer.steps=5", "name=stop", "trainer.nonfinite=stop",
                                   "trainer.eval_every=1000"))
    trainer.train_iter = _Poisoned(trainer.train_iter, {2})
    with pytest.raises(NonFiniteError, match="stopping at step 2"):
        trainer.run()


def test_skipped_update_leaves_state_untouched(tmp_path):
    trainer = Trainer(small_config(tmp_path, "trainer.steps=1", "name=direct"))
    batch = next(trainer.train_iter)
    batch = dict(batch, loss_mask=np.full_like(batch["loss_mask"], np.nan))
    before = jax.tree.map(np.asarray, trainer.state)
    from sparsetrain.train.sharding import global_batch
    with jax.set_mesh(trainer.mesh):
        state, metrics = trainer.steps_for(0)[0](trainer.state, global_batch(batch, trainer.mesh))
    assert not bool(metrics["finite"])
    for a, b in zip(jax.tree.leaves(before["params"]), jax.tree.leaves(state["params"])):
        np.testing.assert_array_equal(a, np.asarray(b))
    for a, b in zip(jax.tree.leaves(before["opt_state"]), jax.tree.leaves(state["opt_state"])):
        np.testing.assert_array_equal(a, np.asarray(b))
