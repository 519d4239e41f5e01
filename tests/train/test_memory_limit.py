"""A step that does not fit in device memory fails before the first batch, naming XLA's estimate, the
limit and the fields that trade memory; an out-of-memory error at run time is one line too. CPUs
report no memory limit, so trainer.memory_limit_bytes forces a small one."""

import jax
import pytest

from sparsetrain.train import Trainer
from sparsetrain.train.memory import OutOfMemory
from tests.train.helpers import small_config

FIELDS = r"data.batch_size.*trainer.grad_accum.*model.remat=full.*trainer.loss_chunk"


def test_a_step_over_the_memory_limit_is_refused_before_training(tmp_path):
    trainer = Trainer(small_config(tmp_path, "trainer.steps=2", "trainer.memory_limit_bytes=100000"))
    with pytest.raises(OutOfMemory, match=rf"needs about .* GiB .* trainer.memory_limit_bytes is 0.00 GiB "
                                          rf"\(100000 bytes\): lower {FIELDS}") as e:
        trainer.run()
    assert "\n" not in str(e.value)
    assert (tmp_path / "tiny" / "metrics.jsonl").read_text() == ""   # not one step ran


def test_out_of_memory_while_running_is_one_line(tmp_path, monkeypatch):
    trainer = Trainer(small_config(tmp_path, "trainer.steps=2"))

    def exhausted(state, batch):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
                                         "123 bytes.\nBufferAssignment OOM Debugging.\n...")

    monkeypatch.setattr(trainer, "steps_for", lambda phase: (exhausted, None))
    with pytest.raises(OutOfMemory, match=rf"out of device memory at step 1 \(RESOURCE_EXHAUSTED: .*123 "
                                          rf"bytes.\): lower {FIELDS}") as e:
        trainer.run()
    assert "\n" not in str(e.value)
