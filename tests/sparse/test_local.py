import jax
import numpy as np
import pytest
from sparsetrain.attention.spec import method_options
from sparsetrain.configbase import ConfigError
from sparsetrain.sparse.local import local_block_mask
from tests.sparse.helpers import inputs, layer, qkv

jax.config.update("jax_default_matmul_precision", "highest")


def local_layer(**fields):
    return layer(method_options("local", **fields))


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
    inp = inputs(q, k, v)
    out = local_layer(block_size=32, local_blocks=local_blocks, initial_blocks=initial_blocks)(inp)
    np.testing.assert_allclose(np.asarray(out), reference_local(inp.q, inp.k, v, 32, local_blocks,
                                                                initial_blocks),
                               atol=2e-5, rtol=2e-5)


def test_block_mask_pattern():
    mask = np.asarray(local_block_mask(256, 256, block_size=64, local_blocks=2, initial_blocks=1))
    assert mask.tolist() == [[True, False, False, False],
                             [True, True, False, False],
                             [True, True, True, False],
                             [True, False, True, True]]


def test_options_validate_the_window():
    with pytest.raises(ConfigError, match="local_blocks"):
        method_options("local", local_blocks=0)
    with pytest.raises(ConfigError, match="initial_blocks"):
        method_options("local", initial_blocks=-1)
    with pytest.raises(ConfigError, match="impl"):
        method_options("local", impl="cudnn")


def test_density_counts_kept_causal_work():
    assert method_options("dense").density(4096) == 1.0
    assert method_options("local", block_size=64, local_blocks=64).density(4096) == pytest.approx(1.0)
    # The diagonal tiles only: 64 tiles of 64*65/2 visible pairs out of 4096*4097/2.
    diagonal = method_options("local", block_size=64, local_blocks=1)
    assert diagonal.density(4096) == pytest.approx(64 * 64 * 65 / (4096 * 4097))
