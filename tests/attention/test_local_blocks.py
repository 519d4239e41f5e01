import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs
from sparsetrain.attention import AttentionSpec, build_attention, dense_causal_attention
from sparsetrain.attention.local_blocks import local_block_mask
from sparsetrain.config import ModelConfig
from sparsetrain.configbase import ConfigError
from sparsetrain.train.model_state import ModelDef

jax.config.update("jax_default_matmul_precision", "highest")


def qkv(seq, heads=4, kv_heads=2, head_dim=16, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (2, seq, heads, head_dim))
    k = jax.random.normal(keys[1], (2, seq, kv_heads, head_dim))
    v = jax.random.normal(keys[2], (2, seq, kv_heads, head_dim))
    return q, k, v


def local_layer(**spec_fields):
    spec = AttentionSpec(method="local", **spec_fields)
    return build_attention(spec, num_heads=4, num_kv_heads=2, head_dim=16, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("seq", [128, 200])  # a block multiple and a ragged length
def test_window_covering_everything_equals_dense(seq):
    q, k, v = qkv(seq)
    out = local_layer(block_size=32, local_blocks=seq // 32 + 1)(q, k, v, q_raw=q, k_raw=k,
                                                                  segment_ids=None)
    np.testing.assert_allclose(np.asarray(out), np.asarray(dense_causal_attention(q, k, v, impl="xla")),
                               atol=1e-5, rtol=1e-5)


def reference_local(q, k, v, bs, local_blocks, initial_blocks):
    """Elementwise rule from the module docstring, in numpy (GQA groups contiguous)."""
    t = q.shape[1]
    p, j = np.arange(t)[:, None], np.arange(t)[None, :]
    allowed = (j <= p) & ((j // bs > p // bs - local_blocks) | (j // bs < initial_blocks))
    kk = np.repeat(np.asarray(k), q.shape[2] // k.shape[2], axis=2)
    vv = np.repeat(np.asarray(v), q.shape[2] // v.shape[2], axis=2)
    s = np.einsum("btnh,bsnh->bnts", np.asarray(q, np.float64), kk) / np.sqrt(q.shape[-1])
    s = np.where(allowed, s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", w, vv)


@pytest.mark.parametrize("local_blocks,initial_blocks", [(1, 0), (2, 1), (3, 2)])
def test_matches_the_elementwise_rule(local_blocks, initial_blocks):
    q, k, v = qkv(176, seed=1)
    out = local_layer(block_size=32, local_blocks=local_blocks, initial_blocks=initial_blocks)(
        q, k, v, q_raw=q, k_raw=k, segment_ids=None)
    np.testing.assert_allclose(np.asarray(out), reference_local(q, k, v, 32, local_blocks, initial_blocks),
                               atol=2e-5, rtol=2e-5)


def test_block_mask_pattern():
    mask = np.asarray(local_block_mask(256, 256, block_size=64, local_blocks=2, initial_blocks=1))
    assert mask.tolist() == [[True, False, False, False],
                             [True, True, False, False],
                             [True, True, True, False],
                             [True, False, True, True]]


def test_spec_validates_the_window():
    with pytest.raises(ConfigError, match="local_blocks"):
        AttentionSpec(method="local", local_blocks=0)
    with pytest.raises(ConfigError, match="initial_blocks"):
        AttentionSpec(method="local", initial_blocks=-1)
    with pytest.raises(ConfigError, match="impl"):
        AttentionSpec(method="local", impl="cudnn")


def test_model_with_dense_first_layer_and_local_rest_builds_and_runs():
    cfg = dataclasses.replace(
        configs.load("tiny").model, num_layers=3, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16,
        mlp_dim=128, dtype="float32",
        attention=(AttentionSpec(), AttentionSpec(layers="1:", method="local", block_size=32)))
    model = ModelDef.create(cfg)
    params = model.init(0)
    tokens = jax.random.randint(jax.random.key(0), (2, 96), 0, cfg.vocab_size)
    logits, aux = model.apply(params, tokens)
    assert logits.shape == (2, 96, cfg.vocab_size) and aux == {}
    assert np.isfinite(np.asarray(logits)).all()
    # Beyond the window the local layers differ from an all-dense model with the same weights.
    dense = ModelDef.create(dataclasses.replace(cfg, attention=(AttentionSpec(),)))
    dense_logits, _ = dense.apply(params, tokens)
    np.testing.assert_allclose(np.asarray(logits[:, :32]), np.asarray(dense_logits[:, :32]), atol=1e-5)
    assert not np.allclose(np.asarray(logits[:, 64:]), np.asarray(dense_logits[:, 64:]), atol=1e-3)


def test_scan_layers_with_local_attention():
    cfg = ModelConfig(num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128,
                      dtype="float32", scan_layers=True,
                      attention=(AttentionSpec(method="local", block_size=16, local_blocks=2),))
    model = ModelDef.create(cfg)
    logits, _ = model.apply(model.init(0), jnp.zeros((1, 48), jnp.int32))
    assert logits.shape == (1, 48, cfg.vocab_size)


def test_density_counts_kept_causal_work():
    from sparsetrain.attention import attention_density
    assert attention_density(AttentionSpec(), 4096) == 1.0
    full = AttentionSpec(method="local", block_size=64, local_blocks=64)
    assert attention_density(full, 4096) == pytest.approx(1.0)
    # 64 query blocks, window of 1 (the diagonal only): 64 half tiles out of 64*64/2 tile-equivalents.
    diagonal = AttentionSpec(method="local", block_size=64, local_blocks=1)
    assert attention_density(diagonal, 4096) == pytest.approx(1 / 64)
