"""The checkpoint under evaluation and what is measured on it: next-token losses, argmax predictions
and the per-layer metrics sparse layers report (`name/<layer>`), for one attention mode:

- "sparse": the model as configured (its per-layer attention rules);
- "dense": the same weights with every layer's method overridden to dense (method parameters such as
  gates are left out), the baseline a sparse method is compared with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sparsetrain.attention.method import StepContext
from sparsetrain.attention.spec import DenseOptions
from sparsetrain.checkpoint.model_def import ModelDef
from sparsetrain.config import DTypeName, RunConfig
from sparsetrain.configbase import apply_overrides
from sparsetrain.data import Tokenizer, load_tokenizer
from sparsetrain.data.pipeline import TokenStream, split_documents, tokenize_documents
from sparsetrain.errors import InputError
from sparsetrain.export.import_hf import read_hf
from sparsetrain.export.pretrained import is_hf_folder, load_checkpoint

MODES = ("sparse", "dense")
METHOD_PARAMS = "/attn/attend/"   # where a layer's method keeps its own parameters


@dataclasses.dataclass(frozen=True)
class Subject:
    """A loaded checkpoint: its run config (with any evaluation overrides applied), flat float32
    params, step (None for HF folders), tokenizer, and the overrides."""

    path: str
    cfg: RunConfig
    flat: dict[str, np.ndarray]
    step: int | None
    tokenizer: Tokenizer
    overrides: tuple[str, ...] = ()

    @property
    def is_sparse(self) -> bool:
        return any(spec.method != "dense" for spec in self.cfg.model.layer_specs)


def load_subject(path: str | Path, *, dtype: DTypeName | None = None, overrides: Sequence[str] = ()) -> Subject:
    """A run directory, a checkpoint folder or a Hugging Face Llama folder (InputError if none).

    overrides: `model.*` config overrides to evaluate the weights under, e.g. another RoPE scaling
    (`model.rope.scaling=yarn model.rope.factor=8 model.rope.original_max_len=2048`) or a
    parameter-free sparse method (`model.attention.0.method=infllm_v2`); the weights must still fit
    the model they describe."""
    if is_hf_folder(path):
        (cfg, flat), step = read_hf(path), None
    else:
        cfg, flat, meta = load_checkpoint(path)
        step = int(meta["step"])
        cfg = cfg.at_step(step)   # the phase the weights were trained in, not the run's first
    if dtype is not None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype=dtype))
    if overrides:
        if outside := [o for o in overrides if not o.startswith("model.")]:
            raise InputError(f"{outside[0]!r}: evaluation overrides change the model only (model.FIELD=VALUE, "
                             "e.g. model.rope.scaling=yarn)")
        cfg = apply_overrides(cfg, list(overrides))
        try:
            ModelDef.create(cfg.model).params_from_flat(flat)
        except ValueError as e:
            raise InputError(f"the checkpoint's weights do not fit the model after {' '.join(overrides)}: {e}") from None
    return Subject(str(path), cfg, flat, step, load_tokenizer(cfg.data.tokenizer), tuple(overrides))


class Runner:
    """One attention mode of a subject, jitted once per input shape."""

    def __init__(self, subject: Subject, mode: str):
        model = subject.cfg.model
        if mode == "dense":
            model = dataclasses.replace(model, attention=(DenseOptions(),))
        self.model_def = ModelDef.create(model)
        flat = subject.flat if mode == "sparse" else {
            k: v for k, v in subject.flat.items() if METHOD_PARAMS not in k}
        self.params = self.model_def.params_from_flat({k: jnp.asarray(v) for k, v in flat.items()})
        self._forward = jax.jit(self._losses_and_predictions)

    def _losses_and_predictions(self, params, tokens, targets, segment_ids, positions):
        logits, _, metrics = self.model_def.apply(params, tokens, positions, segment_ids,
                                                  ctx=StepContext(train=False))
        # logsumexp - target logit: XLA reduces without a second [B, T, V] array (log_softmax's).
        target = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        nll = jax.nn.logsumexp(logits, axis=-1) - target                                 # [B, T]
        return nll, jnp.argmax(logits, axis=-1).astype(jnp.int32), metrics

    def __call__(self, tokens: np.ndarray, *, targets: np.ndarray | None = None, segment_ids: np.ndarray | None = None,
                 positions: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        """tokens int32 [B, T] -> (next-token losses, argmax predictions [B, T], metrics averaged
        over the batch: density, recall and the rest, overall and per layer `name/<i>`).

        The losses are [B, T-1], of tokens[:, 1:], or [B, T] of `targets` when given.
        segment_ids / positions [B, T]: packed documents, as training batches hold them."""
        shifted = targets is None
        if shifted:
            targets = np.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)   # the last column is unused
        as_array = lambda x: None if x is None else jnp.asarray(x, jnp.int32)   # noqa: E731
        nll, predicted, metrics = self._forward(self.params, as_array(tokens), as_array(targets),
                                                as_array(segment_ids), as_array(positions))
        nll = np.asarray(nll)
        return nll[:, :-1] if shifted else nll, np.asarray(predicted), {k: float(v) for k, v in metrics.items()}


def held_out(subject: Subject) -> TokenStream:
    """The run's validation documents (its data config's split), joined with eos as training packs
    them."""
    data = subject.cfg.data
    documents = tokenize_documents(data, subject.tokenizer)
    _, val_ids = split_documents(len(documents), data.val_fraction, data.seed)
    return TokenStream.concat([documents[i] for i in val_ids], subject.tokenizer.eos_id,
                              subject.tokenizer.vocab_size)
