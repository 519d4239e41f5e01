"""Run in a subprocess with 8 fake CPU devices: loss, gradients and reported losses/metrics of every
sparse method on context-parallel meshes against one device, on packed documents (and plain rows for
some). Each case puts a method in each of the model's layers, so every compile checks several.

    python context_parallel_methods_script.py RUN_DIR EXCHANGE
        -> one JSON line: {case: {mesh: [loss err, grad err, reported err]}}

EXCHANGE "all_gather": every method on mesh.context 2 and 4; "ring": the ring K/V exchange on
mesh.context 4 for the methods that run over it.
"""

import functools
import json
import sys
from pathlib import Path

import jax

from sparsetrain.attention.context_parallel import kv_exchange
from sparsetrain.attention.method import StepContext
from sparsetrain.checkpoint.model_def import ModelDef, flatten
from sparsetrain.config import MeshConfig
from sparsetrain.train.sharding import batch_sharding, make_mesh, param_shardings
from sparsetrain.train.step import accumulate_gradients
from tests.train.context_parallel_script import SEQ, batch, rel_err
from tests.train.helpers import small_config

# Sizes scaled to 16-token blocks and 128 tokens (the conformance suite's choices).
INFLLM = "block_size: 16, kernel_size: 8, kernel_stride: 4, coarse_size: 16, coarse_stride: 8, topk: 3, local_blocks: 1"
NSA = ("block_size: 16, kernel_size: 8, kernel_stride: 4, topk: 4, window: 24, score_chunk: 32, "
       "compressor_hidden: 16, recall_in_training: true")
# {case: (rule of layer 0, rule of layer 1, ...)} in inline YAML.
ALL_GATHER_CASES = {
    # Seer's distillation (dense output, block-score target) and MoBA per tile, both with recall.
    "seer_distill+moba_tile": ("method: seer, block_size: 16, d_gate: 16, recall_in_training: true",
                               "method: moba, block_size: 16, moba_block: 32, topk: 2, recall_in_training: true"),
    # Token selections: InfLLM-V2 per token (sparse from the start) and NSA's three branches.
    "infllm_token+nsa": (f"method: infllm_v2, {INFLLM}, dense_len: 0, score_chunk: 32", f"method: nsa, {NSA}"),
    # SSA's full branch beside a token selection and a sparse Seer layer (shared GQA selection).
    "moba_token_ssa+seer_sparse_ssa": (
        "method: moba, block_size: 16, moba_block: 32, topk: 2, granularity: token, ssa: true",
        "method: seer, block_size: 16, d_gate: 16, mode: sparse, share_kv_heads: true, select: density, "
        "target_density: 0.5, ssa: true"),
    # InfLLM-V2 per tile switching to sparse at 48 tokens, and below dense_len (its dense regime).
    "infllm_tile+infllm_dense": (f"method: infllm_v2, {INFLLM}, dense_len: 48, granularity: tile, score_chunk: 32",
                                 "method: infllm_v2, block_size: 16"),
}
RING_CASES = {
    # Token lists renumbered per visiting chunk; a tile mask and the full branch over the ring.
    "infllm_token+seer_sparse_ssa": (ALL_GATHER_CASES["infllm_token+nsa"][0],
                                     ALL_GATHER_CASES["moba_token_ssa+seer_sparse_ssa"][1]),
    # MoBA's tiles, local's fixed pattern and a dense layer (K/V in the layout order).
    "moba_tile+local+dense": ("method: moba, block_size: 16, moba_block: 32, topk: 2",
                              "method: local, block_size: 16, local_blocks: 2, initial_blocks: 1", "method: dense"),
}
MESHES = {"context4_data2": MeshConfig(data=2, context=4), "context2_data2_fsdp2": MeshConfig(data=2, fsdp=2, context=2)}
# {exchange: (cases, meshes on packed documents, cases also run on plain rows on context 4)}
PLANS = {"all_gather": (ALL_GATHER_CASES, tuple(MESHES), ("seer_distill+moba_tile", "infllm_token+nsa")),
         "ring": (RING_CASES, ("context4_data2",), ())}


def main(root: Path, exchange: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    cases, document_meshes, plain_cases = PLANS[exchange]
    ctx = StepContext(train=True, rng=jax.random.key(3))   # training: SSA's branch and coin run
    out = {}
    for case, layers in cases.items():
        rules = ", ".join(f"{{layers: '{i}', {rule}}}" for i, rule in enumerate(layers))
        cfg = small_config(root, "model.dtype=float32", f"data.seq_len={SEQ}", f"model.max_seq_len={SEQ}",
                           f"model.num_layers={len(layers)}", f"model.attention=[{rules}]")
        model = ModelDef.create(cfg.model)
        params = model.init(0)
        step = jax.jit(functools.partial(accumulate_gradients, model=model, cfg=cfg.trainer, ctx=ctx,
                                         trainable=frozenset(flatten(params))))
        for documents in (False, True):
            meshes = document_meshes if documents else ("context4_data2",) if case in plain_cases else ()
            if not meshes:
                continue
            data = batch(documents)
            want_grads, want_loss, _, want_reported = step(params, data)
            for name in meshes:
                mesh = make_mesh(MESHES[name])
                placed = jax.device_put(params, param_shardings(model.logical_axes(), model.abstract_params(), mesh))
                with jax.set_mesh(mesh), kv_exchange(exchange):
                    got_grads, got_loss, _, got_reported = step(placed, jax.device_put(data, batch_sharding(mesh)))
                assert set(got_reported) == set(want_reported), (case, set(got_reported) ^ set(want_reported))
                names = sorted(want_reported)
                out.setdefault(case + ("_documents" if documents else ""), {})[name] = [
                    rel_err(got_loss, want_loss), rel_err(got_grads, want_grads),
                    rel_err([got_reported[k] for k in names], [want_reported[k] for k in names])]
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    with jax.default_matmul_precision("highest"):
        main(Path(sys.argv[1]), sys.argv[2])
