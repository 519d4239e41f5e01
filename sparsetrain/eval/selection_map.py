"""For one example and one head: the key blocks a sparse layer selected, over the true pooled
attention map (SeerAttention's block ground truth: the max-pooled, row-normalised softmax map).

The layer's method is wrapped to record the inputs it is called with during one eager forward pass,
then asked for its selection and its block scores on exactly those inputs.
"""

from __future__ import annotations

import numpy as np

from sparsetrain.attention.method import SparseMethod
from sparsetrain.eval.measure import Runner


class _Recorder:
    """Stands in for a layer's method: records its AttentionInputs, then runs it."""

    def __init__(self, method: SparseMethod):
        self.method, self.inputs = method, None

    def __call__(self, inp):
        self.inputs = inp
        return self.method(inp)


def first_sparse_layer(runner: Runner) -> int | None:
    specs = runner.model_def.cfg.layer_specs
    return next((i for i, spec in enumerate(specs) if spec.method != "dense"), None)


def selection_map(runner: Runner, tokens: np.ndarray, layer: int, head: int = 0) -> dict:
    """tokens int32 [T] -> {"selected": bool [nQ, nK], "scores": f32 [nQ, nK], "block_size",
    "covered": share of the scores' total mass on selected blocks} for query head `head`."""
    model = runner.model_def.bind(runner.params)
    attention = model.layers[layer].attn
    recorder = _Recorder(attention.attend)
    attention.attend = recorder
    model(np.asarray(tokens, np.int32)[None])
    method, inp = recorder.method, recorder.inputs
    mask = np.asarray(method.select(inp).to_mask())[0]                 # [heads or kv heads, rows, nK]
    scores = np.asarray(method.block_scores(inp))[0, head]             # [nQ, nK]
    selected = mask[head * mask.shape[0] // runner.model_def.cfg.num_heads]
    if selected.shape[0] != scores.shape[0]:
        # Token-granular selections (one row per query token): a block row is selected where any
        # of its tokens selects it.
        bs = method.options.block_size
        rows = np.zeros((scores.shape[0] * bs, selected.shape[1]), bool)
        rows[:selected.shape[0]] = selected
        selected = rows.reshape(scores.shape[0], bs, -1).any(axis=1)
    return {"selected": selected, "scores": scores, "block_size": method.options.block_size,
            "covered": float((scores * selected).sum() / max(scores.sum(), 1e-30))}
