"""BLASST (`skip_threshold`): the tile kernel against the reference (which replays its loop) with
tiles skipped (outputs, LSE, gradients, the skipped tiles), lambda = 0 against the plain kernel
bit for bit, the skipped fraction against lambda, the error against unskipped attention within
its bound, and bad values. Interpret mode on CPU; the kernel checks also run compiled (gpu)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse import kernel, reference
from sparsetrain import ops
from tests.ops.helpers import GPU_ONLY, seeded_rng
from tests.ops.test_key_bias import biased_inputs
from tests.tolerances import assert_close_to_scale

MODES = [pytest.param(True, id="interpret"), pytest.param(False, id="compiled", marks=GPU_ONLY)]
T, S, BS, DH, N, KH = 130, 130, 16, 32, 2, 1   # ragged, GQA 2:1


def peaked_inputs(rng, docs=False):
    """q scaled up so that softmax rows are peaked, and BLASST has tiles to skip whatever the seed:
    the first key of each document gets a dominant bias and its block is selected for every query
    tile, so every tile the kernel visits after it falls below the running maximum + ln(lambda)."""
    q, k, v, bias, mask, seg = biased_inputs(rng, T, S, BS, DH, N, KH, docs)
    firsts = [0] if seg is None else [0, int(np.argmax(np.asarray(seg.kv[0]) == 2))]
    bias = bias.at[:, :, firsts].add(12.0)
    mask = (mask | (rng.random(mask.shape) < 0.5)).at[..., [f // BS for f in firsts]].set(True)
    return 2.5 * q, k, v, bias, mask, seg


def attention(impl, mask, **kw):
    """(q, k, v, bias) -> ((o, lse), skipped) of the kernel (interpret or compiled) or the reference."""
    fn = reference.block_sparse_attention if impl == "reference" else kernel.block_sparse_attention
    extra = {} if impl == "reference" else {"interpret": impl == "interpret"}

    def run(q, k, v, bias):
        o, lse, skipped = fn(q, k, v, mask, block_size=BS, key_bias=bias, return_lse=True, return_skipped=True,
                             **extra, **kw)
        return (o, lse), skipped
    return run


def value_and_grads(fn, args, cot):
    """(o, lse, skipped) and the gradients of sum(o * do) + sum(lse * dlse) in every argument."""
    (o, lse), pull, skipped = jax.vjp(fn, *args, has_aux=True)
    return (o, lse, skipped), pull(cot)


@pytest.mark.parametrize("interpret", MODES)
def test_kernel_skips_what_the_reference_skips_with_gradients(interpret, request):
    rng = seeded_rng(request)
    q, k, v, bias, mask, seg = peaked_inputs(rng, docs=True)
    kw = dict(segment_ids=seg, skip_threshold=0.05)
    cot = (jnp.asarray(rng.standard_normal(q.shape), jnp.float32),
           jnp.asarray(rng.standard_normal((1, N, T)), jnp.float32))
    impl = "interpret" if interpret else "compiled"
    with kernel.poison_outputs():
        (o, lse, skipped), grads = value_and_grads(jax.jit(attention(impl, mask, **kw)), (q, k, v, bias), cot)
    with jax.default_matmul_precision("highest"):
        (o_t, lse_t, skipped_t), grads_t = value_and_grads(jax.jit(attention("reference", mask, **kw)),
                                                           (q, k, v, bias), cot)
    np.testing.assert_array_equal(skipped, skipped_t)
    assert 0 < int(skipped.sum()), "nothing skipped: the test checks no skip"
    assert_close_to_scale(o, o_t, 2e-5, err_msg="o")
    finite = np.isfinite(np.asarray(lse_t))
    assert_close_to_scale(np.asarray(lse)[finite], np.asarray(lse_t)[finite], 2e-5, err_msg="lse")
    for name, g, g_t in zip(("dq", "dk", "dv", "dbias"), grads, grads_t):
        assert_close_to_scale(g, g_t, 1e-4, err_msg=name)


@pytest.mark.parametrize("interpret", MODES)
def test_lambda_zero_is_the_plain_kernel_bit_for_bit(interpret, request):
    rng = seeded_rng(request)
    q, k, v, bias, mask, _ = peaked_inputs(rng)
    cot = (jnp.asarray(rng.standard_normal(q.shape), jnp.float32),
           jnp.asarray(rng.standard_normal((1, N, T)), jnp.float32))
    impl = "interpret" if interpret else "compiled"
    with kernel.poison_outputs():
        (o0, lse0, skipped), grads0 = value_and_grads(jax.jit(attention(impl, mask, skip_threshold=0.0)),
                                                      (q, k, v, bias), cot)
        (o, lse, _), grads = value_and_grads(jax.jit(attention(impl, mask)), (q, k, v, bias), cot)
    assert not np.asarray(skipped).any()
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv", "dbias"), (o0, lse0, *grads0), (o, lse, *grads)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


def test_skipped_fraction_rises_with_lambda_and_the_error_stays_within_its_bound(request):
    """On the reference (the kernel's decisions, checked above). A skipped tile's rows each hold
    less than lambda * bs of the running maximum's weight, so the skipped share of a row's softmax
    is below lambda * bs * (tiles it skipped), and the output moves by at most twice that share
    times max |v|."""
    rng = seeded_rng(request)
    q, k, v, bias, mask, _ = peaked_inputs(rng)
    with jax.default_matmul_precision("highest"):
        o_plain = attention("reference", mask)(q, k, v, bias)[0][0]
        fractions = []
        for lam in (0.0, 1e-3, 1e-2, 0.1, 0.5):
            (o, _), skipped = attention("reference", mask, skip_threshold=lam)(q, k, v, bias)
            fractions.append(float(skipped.sum() / ops.Selection.from_mask(mask).to_mask().sum() / N))
            per_row = np.repeat(np.asarray(skipped).sum(-1), BS, axis=-1)[..., :T]          # [B, N, T]
            bound = 2 * lam * BS * per_row * float(jnp.abs(v).max())
            err = np.abs(np.asarray(o - o_plain)).max(-1).transpose(0, 2, 1)                 # [B, N, T]
            assert (err <= bound + 1e-5).all(), (lam, float((err - bound).max()))
    print("skipped fraction by lambda:", fractions)
    assert fractions[0] == 0.0 and fractions[-1] > 0.0
    assert all(a <= b for a, b in zip(fractions, fractions[1:])), fractions


def test_bad_skip_threshold_names_the_field():
    q = jnp.zeros((1, 32, 2, 16))
    k = v = jnp.zeros((1, 32, 1, 16))
    every = jnp.ones((1, 1, 2, 2), bool)
    for bad in (1.0, -0.1, True, "0.1"):
        for impl in ("xla", "pallas"):
            with pytest.raises(ValueError, match=r"skip_threshold=.* pass None \(off\) or a number in \[0, 1\)"):
                ops.block_sparse_attention(q, k, v, every, block_size=16, skip_threshold=bad, impl=impl,
                                           interpret=True)


def test_layers_report_the_skipped_share():
    """BLASST on a model (random weights, reference kernels): layer 0 dense
    (`DenseOptions.skip_threshold`), layer 1 a block-sparse method (`local` at full budget); each
    reports the share of its tiles it skipped, the sparse one above 0 at lambda 0.5 (lambda 0 is the
    plain kernel: test_lambda_zero_is_the_plain_kernel_bit_for_bit)."""
    from sparsetrain.attention.spec import DenseOptions, method_options
    from sparsetrain.checkpoint.model_def import ModelDef
    from tests.export.helpers import random_params
    from tests.sparse.helpers import TINY, tokens

    rules = (DenseOptions(impl="xla", skip_threshold=0.5),
             method_options("local", layers="1:", block_size=16, local_blocks=64, impl="xla", skip_threshold=0.5))
    cfg = dataclasses.replace(TINY, num_layers=2, attention=rules)
    # Random weights: peaked enough to skip tiles (a fresh model's attention is nearly uniform).
    _, _, metrics = jax.jit(ModelDef.create(cfg).apply)(random_params(cfg, 0), jnp.asarray(tokens(150)))
    # The dense layer's 64-row tiles rarely have every row below the threshold at this length.
    assert 0.0 <= float(metrics["skipped/0"]) < 1.0 and 0.0 < float(metrics["skipped/1"]) < 1.0, metrics
