"""Run in a subprocess with 8 fake CPU devices: loss, gradients and reported losses/metrics of every
sparse method on context-parallel meshes against one device, on packed documents (and plain rows for
one case). Each case puts a method in each of the model's layers, so every compile checks several,
and each one-device reference serves every mesh of its case: mesh.context 4 with the all-gather K/V
exchange for every case; mesh.context 2 with FSDP for one, and 4 over the ring for the case that
holds every method that runs over it. Compiling is most of the time, so each extra mesh runs where
it checks something the others do not.

    python context_parallel_methods_script.py RUN_DIR
        -> one JSON line: {case: {mesh: [loss err, grad err, reported err]}}
"""

import functools
import json
import sys
from pathlib import Path

import jax
import numpy as np

from sparsetrain.attention.method import StepContext
from sparsetrain.checkpoint.model_def import ModelDef, flatten
from sparsetrain.config import MeshConfig
from sparsetrain.sparse import key_scores
from sparsetrain.train.sharding import batch_sharding, make_mesh, on_mesh, param_shardings
from sparsetrain.train.step import accumulate_gradients
from tests.train.context_parallel_script import SEQ, batch, rel_err
from tests.train.helpers import small_config

# Sizes scaled to 16-token blocks and 128 tokens (the conformance suite's choices).
INFLLM = "block_size: 16, kernel_size: 8, kernel_stride: 4, coarse_size: 16, coarse_stride: 8, topk: 3, local_blocks: 1"
NSA = ("block_size: 16, kernel_size: 8, kernel_stride: 4, topk: 4, window: 24, score_chunk: 32, "
       "compressor_hidden: 16, recall_in_training: true")
NOSA = ("block_size: 16, kernel_size: 8, kernel_stride: 4, coarse_size: 16, coarse_stride: 8, topk: 4, "
        "local_blocks: 1, query_topk: 1, score_chunk: 32")
DSA = "block_size: 16, index_heads: 2, index_dim: 16, index_rope_dim: 8, topk: 24, dense_len: 16"
RING_CASE = "seer_sparse_ssa+moba_tile+nosa+dma+infllm_tile+local+dense"
# {case: (rule of layer 0, rule of layer 1, ...)} in inline YAML.
CASES = {
    # Every method that runs over the ring, so that one ring compile checks them all: a sparse Seer
    # layer (shared GQA selection) with SSA's full branch, MoBA per tile with recall, NOSA and DMA
    # (their learned key bias travels with K/V, its gradient back with theirs), InfLLM-V2 per tile
    # switching to sparse at 48 tokens, local's fixed pattern, and a dense layer (K/V in the layout
    # order).
    RING_CASE: (
        "method: seer, block_size: 16, d_gate: 16, mode: sparse, share_kv_heads: true, select: density, "
        "target_density: 0.5, ssa: true",
        "method: moba, block_size: 16, moba_block: 32, topk: 2, recall_in_training: true",
        f"method: nosa, {NOSA}", "method: dma, block_size: 16, window: 48",
        f"method: infllm_v2, {INFLLM}, dense_len: 48, granularity: tile, score_chunk: 32",
        "method: local, block_size: 16, local_blocks: 2, initial_blocks: 1", "method: dense"),
    # Token selections: InfLLM-V2 per token (sparse from the start), NSA's three branches, and DSA's
    # sparse phase (the indexer's top-k keys per token, its KL over them, recall; two query chunks).
    "infllm_token+nsa+dsa_sparse": (
        f"method: infllm_v2, {INFLLM}, dense_len: 0, score_chunk: 32", f"method: nsa, {NSA}",
        f"method: dsa, {DSA}, mode: sparse, query_chunk: 64, recall_in_training: true"),
    # SSA's full branch beside a token selection, Seer's distillation (dense output, block-score
    # target) with recall, DSA's warm-up (dense attention, the indexer's KL over every causal key),
    # and InfLLM-V2 below dense_len (its dense regime).
    "moba_token_ssa+seer_distill+dsa_warmup+infllm_dense": (
        "method: moba, block_size: 16, moba_block: 32, topk: 2, granularity: token, ssa: true",
        "method: seer, block_size: 16, d_gate: 16, recall_in_training: true",
        f"method: dsa, {DSA}, mode: warmup", "method: infllm_v2, block_size: 16"),
}
# name -> (mesh, K/V exchange, the cases whose packed documents run on it)
MESHES = {"context4_data2": (MeshConfig(data=2, context=4), "all_gather", tuple(CASES)),
          # n=2 and parameters split over fsdp; the case of the methods that do not run on the ring
          "context2_data2_fsdp2": (MeshConfig(data=2, fsdp=2, context=2), "all_gather",
                                   ("infllm_token+nsa+dsa_sparse",)),
          "context4_data2_ring": (MeshConfig(data=2, context=4, kv_exchange="ring"), "ring", (RING_CASE,))}
# Packed documents run on every mesh that names the case; this case also runs plain rows (no
# segment ids: Seer's block scores then hide the rolled-in keys by ids of their own), on the
# finer all-gather split.
PLAIN_CASES = ("moba_token_ssa+seer_distill+dsa_warmup+infllm_dense",)


def document_meshes(case: str) -> list[str]:
    return [name for name, (_, _, cases) in MESHES.items() if case in cases]


def with_key_scores(model, params):
    """params with DMA's and NOSA's key-score scale A at N(0, 1): it starts at 0, where their bias
    is 0 and every block ties, so the check would pass without the bias ever reaching the kernel."""
    flat = flatten(params)
    rng = np.random.default_rng(0)
    flat.update({k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in flat.items()
                 if k.endswith(key_scores.SCALE)})
    return model.params_from_flat(flat)


def main(root: Path) -> None:
    assert jax.device_count() == 8, jax.devices()
    ctx = StepContext(train=True, rng=jax.random.key(3))   # training: SSA's branch and coin run
    out = {}
    for case, layers in CASES.items():
        rules = ", ".join(f"{{layers: '{i}', {rule}}}" for i, rule in enumerate(layers))
        cfg = small_config(root, "model.dtype=float32", f"data.seq_len={SEQ}", f"model.max_seq_len={SEQ}",
                           f"model.num_layers={len(layers)}", f"model.attention=[{rules}]")
        model = ModelDef.create(cfg.model)
        params = with_key_scores(model, model.init(0))

        def step():
            """The step jitted anew: the K/V exchange is read while tracing but is not part of jit's
            cache key, so one jitted step would run the ring mesh with the all-gather's program."""
            return jax.jit(functools.partial(accumulate_gradients, model=model, cfg=cfg.trainer, ctx=ctx,
                                             trainable=frozenset(flatten(params))))

        for documents in (False, True):
            meshes = document_meshes(case) if documents else ["context4_data2"] if case in PLAIN_CASES else []
            if not meshes:
                continue
            data = batch(documents)
            want_grads, want_loss, _, want_reported = step()(params, data)
            for name in meshes:
                mesh_cfg = MESHES[name][0]
                mesh = make_mesh(mesh_cfg)
                placed = jax.device_put(params, param_shardings(model.logical_axes(), model.abstract_params(), mesh))
                with on_mesh(mesh, mesh_cfg):
                    got_grads, got_loss, _, got_reported = step()(placed, jax.device_put(data, batch_sharding(mesh)))
                assert set(got_reported) == set(want_reported), (case, set(got_reported) ^ set(want_reported))
                names = sorted(want_reported)
                out.setdefault(case + ("_documents" if documents else ""), {})[name] = [
                    rel_err(got_loss, want_loss), rel_err(got_grads, want_grads),
                    rel_err([got_reported[k] for k in names], [want_reported[k] for k in names])]
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    with jax.default_matmul_precision("highest"):
        main(Path(sys.argv[1]))
