"""Document masking of packed sequences: the tile rules, dense attention (both paths), and the model
with and without `data.cross_document_attention`. Every sparse method's packed-vs-alone check is in
the conformance suite (tests/sparse/test_conformance.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsetrain.attention.dense import dense_causal_attention, document_tiles_attention
from sparsetrain.attention.documents import (block_document_tokens, document_block_mask, last_document_starts,
                                             same_document)
from sparsetrain.attention.spec import method_options
from sparsetrain.checkpoint.model_def import ModelDef, flatten
from sparsetrain.data.examples import document_positions
from sparsetrain.export import export_checkpoint
from sparsetrain.sparse.pooling import pool_blocks
from tests.sparse.helpers import TINY, qkv, segment_positions, tokens


def packed_segments(lengths: list[int], seq: int) -> np.ndarray:
    """int32 [seq]: documents 1, 2, ... of the given lengths, then padding (0)."""
    ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(seq - sum(lengths))])
    return ids.astype(np.int32)


def random_segments(rng, seq: int) -> np.ndarray:
    """Contiguous documents of random lengths (some of 1 token), maybe padded at the end."""
    lengths, total = [], 0
    while total < seq - 8:
        lengths.append(int(min(rng.choice([1, 3, 17, 40]), seq - total)))
        total += lengths[-1]
    return packed_segments(lengths, seq)


@pytest.mark.parametrize("seq,block,key_block", [(100, 16, None), (64, 16, 32), (37, 8, 16)])
def test_document_block_mask_is_exact(seq, block, key_block):
    rng = np.random.default_rng(seq)
    seg = jnp.asarray(np.stack([random_segments(rng, seq) for _ in range(3)]))
    key_block = key_block or block
    pairs = np.asarray(same_document(seg))                                # [B, T, T]
    n_q, n_k = -(-seq // block), -(-seq // key_block)
    pairs = np.pad(pairs, ((0, 0), (0, n_q * block - seq), (0, n_k * key_block - seq)))
    expected = pairs.reshape(3, n_q, block, n_k, key_block).any(axis=(2, 4))
    np.testing.assert_array_equal(np.asarray(document_block_mask(seg, block, key_block)), expected)


def test_block_documents_and_starts():
    seg = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 3, 0, 0]])
    positions = jnp.asarray([document_positions(np.asarray(seg[0]))])
    assert positions.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 0, 1]]
    # Blocks of 4: [1 1 1 2] [2 2 2 3] [0 0].
    assert block_document_tokens(seg, 4, "last").tolist() == [[0, 0, 0, 1, 0, 0, 0, 1, 1, 1]]
    assert block_document_tokens(seg, 4, "first").tolist() == [[1, 1, 1, 0, 1, 1, 1, 0, 1, 1]]
    # Block 1's last document (3) starts at its 4th token, so the block would start at -3 there.
    assert last_document_starts(positions, 4).tolist() == [[-3, -3, 0]]
    x = jnp.arange(10.0).reshape(1, 10, 1, 1)
    pooled = pool_blocks(x, 4, ("avg", "max"), block_document_tokens(seg, 4, "last"))
    assert pooled[0, :, 0].tolist() == [[3.0, 3.0], [7.0, 7.0], [8.5, 9.0]]


def alone_and_packed(fn, lengths, seq, seed=0):
    """(packed outputs, packed grads, [(each document's outputs, grads)]) of fn(q, k, v, seg) under
    the loss sum(out * cotangent), so gradients compare slice by slice."""
    q, k, v = qkv(seq, seed=seed, batch=1)
    cot = jax.random.normal(jax.random.key(seed + 1), q.shape)
    seg = jnp.asarray(packed_segments(lengths, seq))[None]

    def run(q, k, v, cot, seg):
        loss = lambda q, k, v: jnp.sum(fn(q, k, v, seg) * cot)
        return fn(q, k, v, seg), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    packed = run(q, k, v, cot, seg)
    starts = np.cumsum([0] + lengths)
    alone = [run(*(x[:, a:b] for x in (q, k, v, cot)), seg[:, a:b]) for a, b in zip(starts[:-1], starts[1:])]
    return packed, alone, starts


def assert_packed_equals_alone(fn, lengths, seq, tol=1e-5):
    (out, grads), alone, starts = alone_and_packed(fn, lengths, seq)
    for (a, b), (doc_out, doc_grads) in zip(zip(starts[:-1], starts[1:]), alone):
        np.testing.assert_allclose(out[:, a:b], doc_out, atol=tol, rtol=tol)
        for g, doc_g in zip(grads, doc_grads):
            np.testing.assert_allclose(g[:, a:b], doc_g, atol=tol, rtol=tol)


@pytest.mark.parametrize("lengths", [[5, 11, 16], [40, 1, 30]])
def test_dense_xla_packed_equals_each_document_alone(lengths):
    with jax.default_matmul_precision("highest"):
        assert_packed_equals_alone(lambda q, k, v, seg: dense_causal_attention(q, k, v, segment_ids=seg, impl="xla"),
                                   lengths, seq=80)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_dense_kernel_path_matches_the_masked_reference(impl):
    """The GPU path (block-sparse kernel over the document tiles) as the jnp reference or the Triton
    kernel (interpreted off a GPU), against XLA with the explicit mask; ragged length, 1-token
    documents."""
    rng = np.random.default_rng(1)
    seg = jnp.asarray(np.stack([random_segments(rng, 150) for _ in range(2)]))
    q, k, v = qkv(150, seed=2)
    with jax.default_matmul_precision("highest"):
        expected = dense_causal_attention(q, k, v, segment_ids=seg, impl="xla")
        got = document_tiles_attention(q, k, v, seg, impl=impl)
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=2e-5)


def test_cross_document_attention_sees_the_earlier_documents():
    """Without segment ids (data.cross_document_attention=True) the second document's logits depend
    on the first; with them they equal the second document's alone."""
    model = ModelDef.create(TINY)
    params = model.init(0)
    toks = jnp.asarray(tokens(64, batch=1))
    seg = jnp.asarray(packed_segments([24, 40], 64))[None]
    positions = segment_positions(seg)
    with jax.default_matmul_precision("highest"):
        masked, _, _ = model.apply(params, toks, positions, seg)
        crossing, _, _ = model.apply(params, toks, None, None)
        alone, _, _ = model.apply(params, toks[:, 24:])
    np.testing.assert_allclose(masked[:, 24:], alone, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(masked[:, :24], crossing[:, :24], atol=1e-4, rtol=1e-4)
    assert not np.allclose(crossing[:, 24:], alone, atol=1e-2)


@pytest.mark.parametrize("rule", [method_options("local", block_size=16, local_blocks=2, initial_blocks=1),
                                  method_options("seer", block_size=16, mode="sparse", topk=2),
                                  method_options("moba", block_size=16, moba_block=32, topk=2, granularity="token")],
                         ids=["local", "seer", "moba"])
def test_export_runs_packed_rows_as_training_does(tmp_path, run_torch, rule):
    """Packed rows (documents aligned to the routing blocks) through the exported model, given as
    transformers packs them (position ids restarting per document, no cache), match the JAX model
    with segment ids."""
    from tests.export.helpers import random_params, save_run
    from tests.export.test_torch_parity import TOLERANCE
    from tests.sparse.helpers import tiny
    cfg = tiny(rule)
    params = random_params(cfg, seed=1)
    fresh = flatten(ModelDef.create(cfg).init(1))
    params = ModelDef.create(cfg).params_from_flat({**flatten(params), **{k: v for k, v in fresh.items()
                                                                           if "/attn/attend/" in k}})
    out = export_checkpoint(save_run(tmp_path, cfg, params), tmp_path / "hf", dtype="float32")
    seg = jnp.asarray(np.stack([packed_segments([64, 32, 32], 160), packed_segments([96, 32], 160)]))
    positions = segment_positions(seg)
    toks = tokens(160, batch=2, seed=3)
    with jax.default_matmul_precision("highest"):
        logits, _, _ = ModelDef.create(cfg).apply(params, jnp.asarray(toks), positions, seg)
    np.savez(out / "jax_packed.npz", tokens=toks, positions=np.asarray(positions), logits=np.asarray(logits))
    result = run_torch("packed", out)
    assert result["logits_max_abs_diff"] <= TOLERANCE * result["logits_scale"], result
