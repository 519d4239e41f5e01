"""block_sparse_attention: Pallas kernel vs the reference, forward and gradients.

Every kernel run happens inside `kernel.poison_outputs()`, so any tile a kernel forgets to write
is NaN and fails `assert_close`. The interpret class runs on CPU; the same tests run compiled on
a GPU (class `TestAttentionCompiled`, marked gpu).
"""

from __future__ import annotations

import dataclasses
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse import kernel, reference
from sparsetrain import ops
from tests.ops.helpers import GPU_ONLY, assert_close, seeded_rng


@dataclasses.dataclass(frozen=True)
class Case:
    seq: int
    block: int = 64
    head_dim: int = 64
    q_heads: int = 2
    kv_heads: int = 2
    mask: str = "random"        # all | random | empty_rows | single
    per_q_head: bool = False    # mask heads = q heads (else kv heads)
    dtype: str = "float32"
    seq_kv: int | None = None   # None: = seq
    causal: bool = True
    batch: int = 1
    lse: bool = False           # also return the LSE and differentiate through it

    def __str__(self):
        return "-".join(f"{k}={v}" for k, v in dataclasses.asdict(self).items()
                        if v != Case.__dataclass_fields__[k].default or k == "seq")


CASES = [
    Case(256, mask="all"),
    Case(200, block=32, head_dim=128, q_heads=4, kv_heads=2, dtype="bfloat16", batch=2),
    Case(64, block=16, q_heads=4, kv_heads=1, per_q_head=True),
    Case(256, block=32, q_heads=4, kv_heads=2, mask="empty_rows", dtype="bfloat16", lse=True),
    Case(256, head_dim=128, q_heads=2, kv_heads=1, mask="single"),
    Case(200, seq_kv=470, q_heads=4, kv_heads=2, lse=True),
    Case(1000, head_dim=128, dtype="bfloat16"),
    Case(1000, q_heads=4, kv_heads=1, per_q_head=True),
    Case(256, block=128, dtype="bfloat16", per_q_head=True),
    Case(200, block=16, head_dim=32, causal=False, mask="empty_rows"),
    Case(130, block=32, head_dim=72, q_heads=2, kv_heads=1),
    Case(250, seq_kv=180, block=32, lse=True),
]
# Interpret mode is slow on CPU: a subset that still covers each axis once (GQA and per-q-head
# masks, S > T and S < T, blocks 16 to 128, head_dim 32/72/128, bf16, empty rows, one block a row,
# non-causal, batch 2, lse); the GPU class runs CASES. An all-True mask: test_all_true_mask_is_dense_causal.
INTERPRET_CASES = [
    Case(200, block=32, head_dim=128, q_heads=4, kv_heads=2, dtype="bfloat16", batch=2),
    Case(64, block=16, q_heads=4, kv_heads=1, per_q_head=True),
    Case(256, block=32, q_heads=4, kv_heads=2, mask="empty_rows", dtype="bfloat16", lse=True),
    Case(200, seq_kv=470, q_heads=4, kv_heads=2, lse=True),
    Case(100, block=16, head_dim=32, causal=False, mask="empty_rows"),
    Case(130, block=32, head_dim=72, q_heads=2, kv_heads=1),
    Case(250, seq_kv=180, block=32, lse=True),
    Case(256, block=128, dtype="bfloat16", per_q_head=True, mask="single"),
]


def make_inputs(rng, c: Case):
    s = c.seq_kv or c.seq
    dt = jnp.dtype(c.dtype)
    # Scale q up a little so the softmax is peaked enough for errors to show.
    q = jnp.asarray(1.5 * rng.standard_normal((c.batch, c.seq, c.q_heads, c.head_dim)), dt)
    k = jnp.asarray(rng.standard_normal((c.batch, s, c.kv_heads, c.head_dim)), dt)
    v = jnp.asarray(rng.standard_normal((c.batch, s, c.kv_heads, c.head_dim)), dt)
    n_q, n_k = -(-c.seq // c.block), -(-s // c.block)
    shape = (c.batch, c.q_heads if c.per_q_head else c.kv_heads, n_q, n_k)
    if c.mask == "all":
        mask = np.ones(shape, bool)
    elif c.mask == "random":
        mask = rng.random(shape) < 0.4
    elif c.mask == "empty_rows":
        mask = (rng.random(shape) < 0.5) & (rng.random(shape[:3] + (1,)) < 0.6)
    else:  # one visible block per row (or none when the row sees nothing)
        visible = np.broadcast_to(np.asarray(ops.causal_block_mask(c.seq, s, c.block)), shape)
        pick = (rng.random(shape[:3]) * visible.sum(-1)).astype(int)
        mask = (np.cumsum(visible, -1) - 1 == pick[..., None]) & visible
    return q, k, v, jnp.asarray(mask)


def naive_attention(q, k, v, block_mask, c: Case, scale: float, same_doc=None):
    """Plain softmax attention, every step in the inputs' dtype: the tolerance baseline.

    same_doc: optional bool [B, T, S] document mask (segment ids)."""
    s_len = k.shape[1]
    g = c.q_heads // c.kv_heads
    elem = jnp.repeat(jnp.repeat(block_mask, c.block, 2), c.block, 3)[:, :, :c.seq, :s_len]
    if c.causal:
        elem = elem & (jnp.arange(s_len)[None, :] <= jnp.arange(c.seq)[:, None] + s_len - c.seq)
    if same_doc is not None:
        elem = elem & same_doc[:, None]
    if not c.per_q_head:
        elem = jnp.repeat(elem, g, axis=1)
    kr, vr = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    logits = jnp.einsum("btnd,bsnd->bnts", q, kr) * jnp.asarray(scale, q.dtype)
    logits = jnp.where(elem, logits, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.where(elem.any(-1, keepdims=True), logits.max(-1, keepdims=True), 0))
    e = jnp.exp(logits - m)
    l = e.sum(-1, keepdims=True)
    o = jnp.einsum("bnts,bsnd->btnd", e / jnp.where(l > 0, l, 1), vr)
    lse = jnp.where(l[..., 0] > 0, jnp.log(jnp.where(l > 0, l, 1))[..., 0] + m[..., 0], -jnp.inf)
    return o, lse.astype(jnp.float32)


def run_vjp(fn, q, k, v, cot, with_lse):
    """Outputs and (dq, dk, dv) of fn for the cotangents `cot` = (do, dlse)."""
    if with_lse:
        out, pull = jax.vjp(fn, q, k, v)
        return out, pull((cot[0].astype(out[0].dtype), cot[1]))
    out, pull, lse = jax.vjp(fn, q, k, v, has_aux=True)  # the LSE is returned, not differentiated
    return (out, lse), pull(cot[0].astype(out.dtype))


def check_against_reference(c: Case, rng, q, k, v, run, truth, naive):
    """Outputs, LSE and gradients (for fresh random cotangents) of `run` (a kernel, traced with
    poisoned outputs) against `truth` (the reference, float32 inputs) within the error of `naive`
    (plain attention in the inputs' dtype). Each callable maps (q, k, v) to (o, lse)."""
    cot = (jnp.asarray(rng.standard_normal(q.shape), jnp.float32),
           jnp.asarray(rng.standard_normal((c.batch, c.q_heads, c.seq)), jnp.float32))
    with kernel.poison_outputs():
        (o, lse), grads = run_vjp(jax.jit(run), q, k, v, cot, c.lse)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    # The reference jitted: one program instead of op-by-op dispatch (float32 either way). The naive
    # baseline too in float32; in bf16/f16 it stays op by op, where a fused program could keep float32
    # intermediates and shrink the baseline error that the tolerance is built from.
    naive = jax.jit(naive) if c.dtype == "float32" else naive
    with jax.default_matmul_precision("highest"):
        (o_t, lse_t), grads_t = run_vjp(jax.jit(truth), *f32, cot, c.lse)
        (o_n, _), grads_n = run_vjp(naive, q, k, v, cot, c.lse)

    assert o.dtype == q.dtype and o.shape == q.shape
    assert_close("o", o, o_n, o_t, c.dtype)
    lse, lse_t = np.asarray(lse), np.asarray(lse_t)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(lse_t), "empty rows differ")
    fin = np.isfinite(lse_t)
    np.testing.assert_allclose(lse[fin], lse_t[fin], rtol=1e-4, atol=1e-4)
    for name, g, g_n, g_t in zip(("dq", "dk", "dv"), grads, grads_n, grads_t):
        assert g.dtype == q.dtype
        assert_close(name, g, g_n, g_t, c.dtype)


class _AttentionTests:
    INTERPRET = True
    CASES = CASES

    def pytest_generate_tests(self, metafunc):
        if metafunc.function.__name__ == "test_matches_reference":
            metafunc.parametrize("c", self.CASES, ids=str)

    def test_matches_reference(self, c: Case, request):
        rng = seeded_rng(request)
        q, k, v, mask = make_inputs(rng, c)
        kw = dict(causal=c.causal, block_size=c.block, return_lse=True)
        check_against_reference(
            c, rng, q, k, v,
            lambda *a: kernel.block_sparse_attention(*a, mask, interpret=self.INTERPRET, **kw),
            lambda *a: reference.block_sparse_attention(*a, mask, **kw),
            lambda *a: naive_attention(*a, mask, c, c.head_dim ** -0.5))

    def test_all_true_mask_is_dense_causal(self, request):
        """An all-True mask must give exactly dense causal attention (float64 numpy)."""
        rng = seeded_rng(request)
        c = Case(192, block=32, q_heads=4, kv_heads=2, mask="all")
        q, k, v, mask = make_inputs(rng, c)
        with kernel.poison_outputs():
            o = kernel.block_sparse_attention(q, k, v, mask, block_size=c.block,
                                              interpret=self.INTERPRET)
        qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
        kn, vn = np.repeat(kn, 2, axis=2), np.repeat(vn, 2, axis=2)
        s = np.einsum("btnd,bsnd->bnts", qn, kn) / np.sqrt(c.head_dim)
        s = np.where(np.tri(c.seq, dtype=bool), s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        dense = np.einsum("bnts,bsnd->btnd", p / p.sum(-1, keepdims=True), vn)
        np.testing.assert_allclose(np.asarray(o), dense, atol=2e-5, rtol=2e-5)

    def test_empty_mask_gives_zeros_and_zero_grads(self, request):
        rng = seeded_rng(request)
        c = Case(100, block=32, mask="random")
        q, k, v, mask = make_inputs(rng, c)
        mask = jnp.zeros_like(mask)
        with kernel.poison_outputs():
            f = lambda q, k, v: kernel.block_sparse_attention(  # noqa: E731
                q, k, v, mask, block_size=c.block, interpret=self.INTERPRET).sum()
            val, grads = jax.value_and_grad(f, argnums=(0, 1, 2))(q, k, v)
        assert float(val) == 0.0
        for g in grads:
            np.testing.assert_array_equal(np.asarray(g), 0.0)


class TestAttentionInterpret(_AttentionTests):
    INTERPRET = True
    CASES = INTERPRET_CASES


class TestAttentionCompiled(_AttentionTests):
    INTERPRET = False
    pytestmark = GPU_ONLY


def test_reference_matches_numpy_float64(request):
    """The reference itself against a float64 numpy loop over heads (GQA, per-kv-head mask, S > T)."""
    rng = seeded_rng(request)
    c = Case(70, seq_kv=150, block=16, q_heads=4, kv_heads=2, mask="empty_rows")
    q, k, v, mask = make_inputs(rng, c)
    o, lse = reference.block_sparse_attention(q, k, v, mask, block_size=16, return_lse=True)
    qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
    mn = np.repeat(np.repeat(np.asarray(mask), 16, 2), 16, 3)[:, :, :70, :150]
    causal = np.arange(150)[None, :] <= np.arange(70)[:, None] + 80
    for h in range(4):
        allowed = mn[0, h // 2] & causal
        s = np.where(allowed, qn[0, :, h] @ kn[0, :, h // 2].T / 8.0, -np.inf)
        m = np.where(allowed.any(1), s.max(1), 0.0)
        e = np.exp(s - m[:, None])
        l = e.sum(1)
        want = (e @ vn[0, :, h // 2]) / np.where(l > 0, l, 1)[:, None]
        np.testing.assert_allclose(np.asarray(o[0, :, h]), want, atol=1e-5, rtol=1e-5)
        want_lse = np.where(l > 0, np.log(np.where(l > 0, l, 1)) + m, -np.inf)
        np.testing.assert_allclose(np.asarray(lse[0, h]), want_lse, atol=1e-5, rtol=1e-5)


def test_kernel_and_reference_signatures_match():
    assert inspect.signature(kernel.block_sparse_attention) == inspect.signature(
        reference.block_sparse_attention)


def test_dispatch_auto_on_cpu_is_reference(request):
    if jax.default_backend() == "gpu":
        pytest.skip("CPU dispatch rule")
    rng = seeded_rng(request)
    q, k, v, mask = make_inputs(rng, Case(64, block=16))
    want = reference.block_sparse_attention(q, k, v, mask, block_size=16)
    np.testing.assert_array_equal(np.asarray(ops.block_sparse_attention(q, k, v, mask, block_size=16)),
                                  np.asarray(want))
    interpreted = ops.block_sparse_attention(q, k, v, mask, block_size=16, impl="pallas")
    np.testing.assert_allclose(np.asarray(interpreted), np.asarray(want), atol=1e-5)
    with pytest.raises(ValueError, match="need a GPU"):
        ops.block_sparse_attention(q, k, v, mask, block_size=16, impl="pallas", interpret=False)


@pytest.mark.parametrize("change, match", [
    (dict(mask_shape=(1, 2, 4, 3)), "block_mask must be"),
    (dict(mask_shape=(1, 3, 4, 4)), "block_mask must be"),
    (dict(mask_dtype=jnp.int32), "block_mask must be bool"),
    (dict(kv_heads=3, q_heads=4), "multiple of num_kv_heads"),
    (dict(k_dtype=jnp.bfloat16), "share one dtype"),
    (dict(q_dtype=jnp.int32, k_dtype=jnp.int32), "share one dtype"),
    (dict(block=48), "block_size=48"),
    (dict(impl="cuda"), "impl="),
    (dict(v_len=32), "v must match k"),
])
def test_bad_inputs_raise_value_error(change, match):
    g = dict(q_heads=4, kv_heads=2, mask_shape=None, mask_dtype=bool, q_dtype=jnp.float32,
             k_dtype=jnp.float32, block=16, impl="auto", v_len=64) | change
    q = jnp.zeros((1, 64, g["q_heads"], 32), g["q_dtype"])
    k = jnp.zeros((1, 64, g["kv_heads"], 32), g["k_dtype"])
    v = jnp.zeros((1, g["v_len"], g["kv_heads"], 32), g["k_dtype"])
    mask = jnp.ones(g["mask_shape"] or (1, g["kv_heads"], 4, 4), g["mask_dtype"])
    with pytest.raises(ValueError, match=match):
        ops.block_sparse_attention(q, k, v, mask, block_size=g["block"], impl=g["impl"])


@pytest.mark.parametrize("block, dtype", [(64, "bfloat16"), (128, "bfloat16"), (64, "float16")])
def test_compiled_long_sequence(block, dtype, request):
    """A longer sequence compiled on the GPU: T=2048, D=128, GQA 2, 40% of the causal tiles."""
    case = Case(2048, block=block, head_dim=128, q_heads=4, kv_heads=2, dtype=dtype, lse=True)
    TestAttentionCompiled().test_matches_reference(case, request)


test_compiled_long_sequence = pytest.mark.gpu(
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")(test_compiled_long_sequence))


def test_poison_hook_fills_outputs_a_kernel_never_writes():
    """The hook itself: a kernel that writes nothing returns the poison value, not stale memory."""
    from jax.experimental import pallas as pl

    spec = pl.BlockSpec((8,), lambda i: (0,))
    with kernel.poison_outputs(7.0):
        out = kernel.pallas(lambda x_ref, o_ref: None, grid=(1,), in_specs=[spec], out_specs=spec,
                            out_shape=jax.ShapeDtypeStruct((8,), jnp.float32), warps=4, stages=2,
                            interpret=jax.default_backend() != "gpu", name="writes_nothing")(jnp.zeros(8))
    np.testing.assert_array_equal(np.asarray(out), 7.0)
