"""The TPU path behind the public API: a tiny training run whose `local` layers go through the
Mosaic TPU kernels (TPU interpreter on CPU) matches the pure-jnp reference path."""

import numpy as np
import pytest

from sparsetrain import ops
from sparsetrain.train import train
from tests.train.helpers import read_metrics, small_config

# One sequence per batch and one validation batch: the TPU interpreter (pltpu.InterpretParams) runs
# the kernels' memory operations through Python callbacks, so its time grows with the batch (a batch
# of 2 took ~25 s per training step and ~20 s per validation batch on 2 busy CPU cores); one
# sequence goes through the same kernels.
LOCAL_TPU = ("model.max_seq_len=384", "data.seq_len=384", "data.batch_size=1", "trainer.eval_batches=1",
             "model.dtype=float32",
             "model.attention.0.method=local", "model.attention.0.block_size=128",
             "trainer.steps=2", "trainer.eval_every=100",  # 3 blocks, a window of 1: sparse
             # The TPU block-score kernel (recall at evaluation) has no document masking yet.
             "data.cross_document_attention=true")


@pytest.mark.slow
def test_local_layers_train_the_same_through_the_tpu_kernels(tmp_path):
    losses = {}
    for impl in ("xla", "pallas_tpu"):
        cfg = small_config(tmp_path, *LOCAL_TPU, f"name={impl}", f"model.attention.0.impl={impl}")
        train(cfg)
        logged = [m for m in read_metrics(tmp_path / impl) if "loss" in m]
        assert logged[0]["density"] < 0.7   # the window leaves tiles out
        losses[impl] = [m["loss"] for m in logged]
    print(f"\nlosses: reference {losses['xla']}, Mosaic TPU (interpreted) {losses['pallas_tpu']}")
    assert len(losses["xla"]) == 2
    np.testing.assert_allclose(losses["pallas_tpu"], losses["xla"], rtol=1e-5)


def test_tpu_kernels_reject_gpu_tiles_and_need_a_tpu_to_compile():
    import jax.numpy as jnp
    q = jnp.zeros((1, 128, 2, 64))
    mask = jnp.ones((1, 2, 2, 2), bool)
    with pytest.raises(ValueError, match="block_size=64 is not supported on TPU"):
        ops.block_sparse_attention(q, q, q, mask, block_size=64, impl="pallas_tpu")
    with pytest.raises(ValueError, match="need a TPU"):
        ops.block_sparse_attention(q, q, q, jnp.ones((1, 2, 1, 1), bool), block_size=128,
                                   impl="pallas_tpu", interpret=False)
