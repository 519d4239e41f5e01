"""The bridge between an NNX model and the pure parameter dicts the trainer, checkpoints and export use.

Training state holds parameters as nested dicts of arrays (`{"layers": {0: {"attn": {"q_proj": ...}}}}`)
so optax masks, orbax checkpoints and export tables all address them by plain paths such as
"layers/0/attn/q_proj". `ModelDef` remembers the graph and each parameter's logical axes, and rebuilds
a live model from a dict inside jitted code.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import traversals

from models import Llama
from models.llama import head_logits
from sparsetrain.attention.method import AuxLoss, AuxMetric, StepContext
from sparsetrain.config import ModelConfig

Params = dict[str, Any]


def path_str(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def flatten(params: Params) -> dict[str, Any]:
    """{"layers/0/attn/q_proj": array, ...}"""
    return {path_str(k): v for k, v in traversals.flatten_mapping(params).items()}


@dataclasses.dataclass(frozen=True)
class ModelDef:
    cfg: ModelConfig
    graphdef: Any
    template: tuple          # ((path, abstract Variable), ...) in the graph's order

    @classmethod
    def create(cls, cfg: ModelConfig) -> "ModelDef":
        abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(abstract)
        return cls(cfg, graphdef, tuple(nnx.to_flat_state(state)))

    def init(self, seed: int) -> Params:
        """Fresh float32 parameters (call under jax.jit with out_shardings to place them)."""
        return nnx.to_pure_dict(nnx.state(Llama(self.cfg, rngs=nnx.Rngs(seed)), nnx.Param))

    def logical_axes(self) -> Params:
        """Same tree as the params, each leaf the tuple of logical axis names of that parameter."""
        flat = {path: var.get_metadata().get("out_sharding") for path, var in self.template}
        return traversals.unflatten_mapping(flat)

    def abstract_params(self) -> Params:
        flat = {path: var.get_value() for path, var in self.template}  # already ShapeDtypeStructs
        return traversals.unflatten_mapping(flat)

    def params_from_flat(self, flat: dict[str, Any]) -> Params:
        """Params in this model's structure from {"layers/0/attn/q_proj": array, ...} (checkpoint
        restores give string layer keys; imports give flat names). Every parameter must be present
        exactly once with its shape."""
        expected = {path_str(path): (path, var.get_value()) for path, var in self.template}
        missing = sorted(set(expected) - set(flat))
        unexpected = sorted(set(flat) - set(expected))
        if missing or unexpected:
            raise ValueError(f"parameters do not match the model: missing {missing}, unexpected {unexpected}")
        out = {}
        for key, (path, abstract) in expected.items():
            if tuple(flat[key].shape) != tuple(abstract.shape):
                raise ValueError(f"parameter {key}: shape {tuple(flat[key].shape)}, model expects "
                                 f"{tuple(abstract.shape)}")
            out[path] = flat[key]
        return traversals.unflatten_mapping(out)

    def bind(self, params: Params) -> nnx.Module:
        """A live model whose parameters are `params` (works on tracers inside jit)."""
        flat = traversals.flatten_mapping(params)
        state = nnx.from_flat_state([(path, var.replace(flat[path])) for path, var in self.template])
        return nnx.merge(self.graphdef, state)

    def apply(self, params: Params, tokens, positions=None, segment_ids=None, ctx: StepContext | None = None):
        """(logits [B, T, V] float32, losses, metrics) for `params`: `hidden_states` then `logits`."""
        hidden, losses, metrics = self.hidden_states(params, tokens, positions, segment_ids, ctx)
        return self.logits(params, hidden), losses, metrics

    def hidden_states(self, params: Params, tokens, positions=None, segment_ids=None,
                      ctx: StepContext | None = None):
        """(final-norm output [B, T, D] in the compute dtype, losses, metrics) for `params`: the
        model without its output head, for losses that project a chunk of tokens at a time.

        losses: {name: mean over the layers that reported it} of the weighted losses layers report
        (the train step adds their sum to the objective). metrics: for each reported metric its
        mean over layers under `name` and each layer's value under `name/<layer>`."""
        model = self.bind(params)
        hidden, loss_state, metric_state = nnx.capture(model.hidden_states, AuxLoss, AuxMetric)(
            tokens, positions, segment_ids, ctx)
        losses = {name: jnp.mean(jnp.stack(list(v.values()))) for name, v in _by_layer(loss_state).items()}
        metrics = {}
        for name, per_layer in _by_layer(metric_state).items():
            metrics[name] = jnp.mean(jnp.stack(list(per_layer.values())))
            metrics.update({f"{name}/{layer}": value for layer, value in per_layer.items()})
        return hidden, losses, metrics

    def logits(self, params: Params, hidden) -> jax.Array:
        """The output head: float32 logits [..., V] of hidden states [..., D]."""
        return self.bind(params).logits(hidden)

    def head(self, params: Params) -> tuple[Callable[[jax.Array, jax.Array], jax.Array], jax.Array]:
        """(logits_fn(hidden [..., D], head [D, V]) -> float32 logits [..., V], the head's master
        weight [D, V]): the output head split for losses that differentiate it themselves."""
        return (functools.partial(head_logits, dtype=jnp.dtype(self.cfg.dtype)),
                self.bind(params).head_weight())

def _by_layer(state) -> dict[str, dict[int, jax.Array]]:
    """{name: {layer index: scalar}} from captured intermediates. `sow` keeps a tuple per
    call: a scalar for a layer of the list (path layers/<i>/...), or one [L] array when the layers
    are scanned."""
    reported: dict[str, dict[int, jax.Array]] = {}
    for path, var in nnx.to_flat_state(state):
        for value in var.get_value():
            values = jnp.ravel(value)
            layers = [path[1]] if isinstance(path[1], int) else range(values.shape[0])
            reported.setdefault(str(path[-1]), {}).update(
                {int(layer): values[i] for i, layer in enumerate(layers)})
    return reported
