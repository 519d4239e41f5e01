import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs
from models import Llama
from models.rope import apply_rope
from sparsetrain.config import ModelConfig, RopeConfig
from tests.tolerances import assert_close_to_scale

TINY = dataclasses.replace(configs.load("tiny").model, num_layers=2, d_model=64, num_heads=4,
                           num_kv_heads=2, head_dim=16, mlp_dim=128, vocab_size=96, dtype="float32")


def tokens(seed, shape=(2, 24), vocab=96):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
def test_shapes_and_causality_with_gqa(num_kv_heads):
    cfg = dataclasses.replace(TINY, num_kv_heads=num_kv_heads)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    x = tokens(1)
    logits = model(x)
    assert logits.shape == (2, 24, cfg.vocab_size) and logits.dtype == jnp.float32
    t = 10
    changed = x.at[:, t + 1:].set((x[:, t + 1:] + 7) % cfg.vocab_size)
    logits2 = model(changed)
    np.testing.assert_array_equal(np.asarray(logits[:, :t + 1]), np.asarray(logits2[:, :t + 1]))
    assert not np.allclose(np.asarray(logits[:, t + 1:]), np.asarray(logits2[:, t + 1:]))


def test_tied_embeddings_have_no_head():
    model = Llama(dataclasses.replace(TINY, tie_embeddings=True), rngs=nnx.Rngs(0))
    assert not hasattr(model, "lm_head")
    assert model(tokens(0)).shape[-1] == TINY.vocab_size


def _stack_into(plain: Llama, scanned: Llama) -> None:
    """Copy a list-of-layers model's weights into a scanned model (stacking on axis 0)."""
    per_layer = [nnx.state(block, nnx.Param) for block in plain.layers]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
    nnx.update(scanned.layers, stacked)
    for name in ("embed", "lm_head"):
        getattr(scanned, name)[...] = getattr(plain, name)[...]
    scanned.final_norm.scale[...] = plain.final_norm.scale[...]


def _loss_and_grads(model, x):
    def loss(m):
        return jnp.mean(jax.nn.logsumexp(m(x), axis=-1))
    value, grads = nnx.value_and_grad(loss)(model)
    return value, grads


@pytest.mark.parametrize("remat,scan", [("full", False), ("dots", False), ("none", True), ("dots", True)])
def test_remat_and_scan_match_plain(remat, scan):
    x = tokens(3)
    plain = Llama(TINY, rngs=nnx.Rngs(0))
    other = Llama(dataclasses.replace(TINY, remat=remat, scan_layers=scan), rngs=nnx.Rngs(0))
    if scan:
        _stack_into(plain, other)
    loss_a, grads_a = _loss_and_grads(plain, x)
    loss_b, grads_b = _loss_and_grads(other, x)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
    ga, gb = grads_a.layers, grads_b.layers
    if scan:
        ga = jax.tree.map(lambda *xs: jnp.stack(xs), *[ga[i] for i in range(TINY.num_layers)])
    for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        assert_close_to_scale(b, a)
    assert_close_to_scale(grads_b.embed[...], grads_a.embed[...])


def test_rope_is_half_split_rotation():
    cfg = RopeConfig(theta=10000.0)
    x = jax.random.normal(jax.random.key(0), (1, 5, 2, 8))
    pos = jnp.arange(5)[None]
    out = apply_rope(x, pos, cfg)
    np.testing.assert_allclose(out[:, 0], x[:, 0], rtol=1e-6)  # position 0 is the identity
    # Pair (i, i + H/2) rotates by angle pos * theta^(-2i/H); norms are preserved.
    i, p = 1, 3
    angle = p * 10000.0 ** (-2 * i / 8)
    a, b = x[0, p, 0, i], x[0, p, 0, i + 4]
    np.testing.assert_allclose(out[0, p, 0, i], a * np.cos(angle) - b * np.sin(angle), rtol=1e-5)
    np.testing.assert_allclose(out[0, p, 0, i + 4], b * np.cos(angle) + a * np.sin(angle), rtol=1e-5)


def test_bfloat16_compute_keeps_float32_params():
    model = Llama(dataclasses.replace(TINY, dtype="bfloat16"), rngs=nnx.Rngs(0))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert jnp.isfinite(model(tokens(0))).all()


def test_partition_annotations_cover_every_parameter():
    model = Llama(TINY, rngs=nnx.Rngs(0))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == var[...].ndim, path


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig(num_heads=4, num_kv_heads=3)


def test_logits_matmul_keeps_the_forward_and_runs_its_backward_in_the_compute_dtype():
    from models.layers import logits_matmul
    kh, kw, kg = jax.random.split(jax.random.key(7), 3)
    h = jax.random.normal(kh, (3, 5, 16), jnp.float32)
    head = jax.random.normal(kw, (16, 40), jnp.float32) * 0.1
    cot = jax.random.normal(kg, (3, 5, 40), jnp.float32)

    def autodiff(h, head, dtype):   # what JAX differentiates without the hand-written backward
        return jnp.einsum("...D,DV->...V", h.astype(dtype), head.astype(dtype), preferred_element_type=jnp.float32)

    for dtype in (jnp.float32, jnp.bfloat16):
        out, pullback = jax.vjp(lambda a, b: logits_matmul(a, b, dtype), h, head)
        ref, ref_pullback = jax.vjp(lambda a, b: autodiff(a, b, dtype), h, head)
        assert out.dtype == jnp.float32
        np.testing.assert_array_equal(out, ref)
        grads, ref_grads = pullback(cot), ref_pullback(cot)
        assert [g.dtype for g in grads] == [jnp.float32, jnp.float32]
        # In float32 the hand-written backward is autodiff's; in bf16 it differs only by rounding
        # the logit gradient to bf16 once (relative 2^-8 per element).
        tol = 1e-6 if dtype == jnp.float32 else 2e-2
        for g, r in zip(grads, ref_grads):
            np.testing.assert_allclose(g, r, rtol=tol, atol=tol * float(jnp.abs(r).max()))
