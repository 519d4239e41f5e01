"""The key-block-outer token kernel's XLA glue, checked directly (no kernel): the entry order and
the program table cover every (entry, query head) row exactly once, each program within one key
block, and the slot merge is the softmax over the union of a row's blocks."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse import token_gather_kernel as gather
from pallas_kernels.block_sparse.common import Dims


def _config(lists, gs: int, rows: int, chunks: int):
    b, h, t, m = lists.shape
    dims = Dims(b, t, t, h * gs, h, h, 16, 16)
    return gather._Config(dims, True, None, 0.25, True, False, slots=m, rows=rows, chunks=chunks)


@pytest.mark.parametrize("gs,rows,chunks", [(1, 16, 1), (3, 16, 2), (4, 32, 4)])
def test_programs_cover_every_row_once_within_one_block(gs, rows, chunks):
    rng = np.random.default_rng(gs)
    t, m, n_k = 50, 3, 4
    lists = np.where(rng.random((2, 2, t, m)) < 0.7, rng.integers(0, n_k, (2, 2, t, m)), -1).astype(np.int32)
    cfg = _config(jnp.asarray(lists), gs, rows, chunks)
    table = gather.entry_table(jnp.asarray(lists), cfg)
    order, block, offset, row0, end = (np.asarray(x) for x in (table.order, table.block, table.offset,
                                                                table.row0, table.row_end))
    assert block.shape[-1] == gather.program_count(cfg)
    for b in range(2):
        for h in range(2):
            seen = []
            for p in range(block.shape[-1]):
                if block[b, h, p] == n_k:
                    assert end[b, h, p] == row0[b, h, p] == 0
                    continue
                for v in range(row0[b, h, p], min(end[b, h, p], row0[b, h, p] + rows * chunks)):
                    entry = order[b, h, offset[b, h, p] + v // gs]
                    assert lists[b, h].reshape(-1)[entry] == block[b, h, p]   # the program's block only
                    seen.append((entry, v % gs))
            want = [(f, g) for f in np.flatnonzero(lists[b, h].reshape(-1) >= 0) for g in range(gs)]
            assert sorted(seen) == sorted(want)


def test_merging_slots_is_the_softmax_over_the_union_of_blocks():
    """Two slots of one row merge into attention over both blocks' keys; an empty slot and an
    all-empty row are ignored (o = 0, LSE +inf)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=8)               # the row's keys: 4 in slot 0, 4 in slot 1
    values = rng.normal(size=(8, 16))
    lists = jnp.asarray([[[[0, 1, -1], [-1, -1, -1]]]], jnp.int32)   # B=1, H=1, T=2, m=3
    cfg = _config(lists, 1, 16, 1)
    o_part = np.zeros((1, 2 * 3 + 1, 1, 16), np.float32)
    lse_part = np.full((1, 2 * 3 + 1, 1), np.nan, np.float32)       # unwritten slots are garbage
    o_part[0, 3:, 0] = np.nan
    flat = logits.reshape(-1)
    for slot, keys in ((0, slice(0, 4)), (1, slice(4, 8))):
        lse = np.log2(np.exp2(flat[keys]).sum())
        lse_part[0, slot, 0] = lse
        o_part[0, slot, 0] = (np.exp2(flat[keys] - lse)[:, None] * values[keys]).sum(0)
    o, lse = gather.merge_slots(jnp.asarray(o_part), jnp.asarray(lse_part), gather._slot_valid(lists, cfg), cfg)
    p = np.exp2(flat - flat.max())
    np.testing.assert_allclose(np.asarray(o)[0, 0, 0], (p[:, None] * values).sum(0) / p.sum(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(lse)[0, 0, 0], np.log2(np.exp2(flat).sum()), rtol=1e-6)
    assert np.asarray(lse)[0, 1, 0] == np.inf and not np.asarray(o)[0, 1].any()
