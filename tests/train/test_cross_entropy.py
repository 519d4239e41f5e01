"""The fused, chunked cross-entropy: the loss and gradients of autodiff over the whole logits, without their memory."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsetrain.attention.method import StepContext
from sparsetrain.checkpoint.model_def import ModelDef, flatten
from sparsetrain.configbase import ConfigError
from sparsetrain.train.cross_entropy import head_loss, token_losses
from sparsetrain.train.step import accumulate_gradients, make_eval_step
from tests.tolerances import assert_close_to_scale
from tests.train.helpers import small_config
from tests.train.test_step import batch


def _head_problem(b=2, t=48, d=16, v=300):
    keys = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(keys[0], (b, t, d))
    head = jax.random.normal(keys[1], (d, v)) * 0.5
    targets = jax.random.randint(keys[2], (b, t), 0, v)
    return h, head, targets


def _matmul(h, head):
    return jnp.einsum("...D,DV->...V", h, head)


@pytest.mark.parametrize("chunk", [0, 1, 12, 96])
@pytest.mark.parametrize("z_loss", [0.0, 0.1])
def test_fused_loss_and_gradients_equal_autodiff_of_the_whole_logits(chunk, z_loss):
    h, head, targets = _head_problem()
    weights = jax.random.uniform(jax.random.key(1), targets.shape)  # stands in for loss_mask
    weights = weights.at[0, :5].set(0.0)                              # masked tokens

    def reference(h, head, weights):
        return jnp.sum(token_losses(_matmul(h, head), targets, z_loss) * weights)

    def fused(h, head, weights):
        return head_loss(_matmul, h, head, targets, weights, z_loss, chunk)

    with jax.default_matmul_precision("highest"):
        want, want_grads = jax.value_and_grad(reference, (0, 1, 2))(h, head, weights)
        got, got_grads = jax.value_and_grad(fused, (0, 1, 2))(h, head, weights)
        undifferentiated = fused(h, head, weights)
        # A cotangent other than 1 scales every gradient (the loss is a term of a larger objective).
        scaled = jax.grad(lambda *a: 3.0 * fused(*a), (0, 1, 2))(h, head, weights)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(undifferentiated, want, rtol=1e-6)
    for got_g, want_g, scaled_g in zip(got_grads, want_grads, scaled):
        assert_close_to_scale(got_g, want_g, rel=1e-5)
        assert_close_to_scale(scaled_g, 3.0 * want_g, rel=1e-5)


def test_chunked_gradient_memory_is_a_few_chunks_of_logits():
    b, t, d, v = 2, 256, 16, 4096
    h, head, targets = _head_problem(b, t, d, v)
    weights = jnp.ones(targets.shape)

    def temp_bytes(chunk):
        loss = lambda h, w: head_loss(_matmul, h, w, targets, weights, 0.1, chunk)
        grad = jax.jit(jax.grad(loss, (0, 1)))
        return grad.lower(h, head).compile().memory_analysis().temp_size_in_bytes

    # Whole: the logits and their gradient, [B, T, V] float32 each. Chunked: the same for one chunk.
    assert temp_bytes(0) >= 2 * b * t * v * 4
    assert temp_bytes(64) < 3 * 64 * v * 4


@pytest.mark.parametrize("chunk", [4, -8])
def test_a_chunk_that_does_not_divide_the_batch_names_the_field(chunk):
    h, head, targets = _head_problem(b=1, t=10)
    with pytest.raises(ValueError, match=f"trainer.loss_chunk={chunk}"):
        head_loss(_matmul, h, head, targets, jnp.ones(targets.shape), 0.0, chunk)


@pytest.mark.parametrize("tie", ["false", "true"])
def test_train_and_eval_steps_match_the_unchunked_path(tmp_path, tie):
    cfg = small_config(tmp_path, "model.dtype=float32", "data.batch_size=4", "trainer.z_loss=0.01",
                       f"model.tie_embeddings={tie}")
    model = ModelDef.create(cfg.model)
    params, data = model.init(0), batch(0)
    everything = frozenset(flatten(params))
    chunked_cfg = dataclasses.replace(cfg.trainer, loss_chunk=16)
    with jax.default_matmul_precision("highest"):
        whole = accumulate_gradients(params, data, model, cfg.trainer, StepContext(), everything)
        chunked = accumulate_gradients(params, data, model, chunked_cfg, StepContext(), everything)
        whole_eval = make_eval_step(model, cfg.trainer)(params, data)
        chunked_eval = make_eval_step(model, chunked_cfg)(params, data)
    np.testing.assert_allclose(chunked[1], whole[1], rtol=1e-6)  # loss, z-loss included
    for k, g in flatten(whole[0]).items():
        assert_close_to_scale(flatten(chunked[0])[k], g, rel=1e-5, err_msg=k)
    np.testing.assert_allclose(chunked_eval["loss_sum"], whole_eval["loss_sum"], rtol=1e-6)


@pytest.mark.parametrize("override, message", [
    ("trainer.loss_chunk=-1", "loss_chunk=-1: must be >= 0"),
    ("trainer.loss_chunk=100", "loss_chunk=100 must divide the 512 tokens of a microbatch"),
])
def test_loss_chunk_is_validated(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        small_config(tmp_path, override)
