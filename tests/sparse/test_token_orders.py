"""Each token-level method's own selection gives the same attention and gradients in both loop
orders of the token kernel (query-outer `token_kernel`, key-block-outer `token_gather_kernel`),
Pallas interpreter on CPU. The kernels' tests use random lists; these use the lists the methods
make (sinks, local blocks, routing blocks, dense rows)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse import kernel
from sparsetrain import ops
from tests.sparse.helpers import inputs, layer, qkv
from tests.sparse.test_conformance import rule

# (method, variant): token granularity (MoBA per token, InfLLM-V2 with dense rows, then sparse ones); G = 2 (4 query heads over 2 kv heads), so the
# query-outer kernel can tile it too.
TOKEN_METHODS = [("nsa", "default"), ("moba", "blocks32"), ("infllm_v2", "switch")]


@pytest.mark.parametrize("method,variant", TOKEN_METHODS, ids=[m for m, _ in TOKEN_METHODS])
def test_both_loop_orders_agree_on_the_methods_selection(method, variant):
    attention = layer(rule(method, variant))
    q, k, v = qkv(72, batch=1)                      # ragged: not a multiple of the block
    inp = inputs(q, k, v)
    sel = attention.select(inp)
    assert sel.granularity == "token", f"{method} {variant} is no longer token-level"
    sel = ops.Selection(sel.indices, sel.counts, sel.num_blocks, granularity="token")
    cot = jax.random.normal(jax.random.key(1), inp.q.shape)

    def run(order):
        def attend(q, k, v):
            return ops.block_sparse_attention(q, k, v, sel, block_size=attention.options.block_size,
                                              impl="pallas", interpret=True)
        with kernel.tuning(kernel.Tuning(token_order=order, gather_rows=16, gather_chunks=2)):
            out, vjp = jax.vjp(attend, inp.q, inp.k, inp.v)
            return (out, *vjp(cot))

    for got, want in zip(run("key"), run("query")):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
