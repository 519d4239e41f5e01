"""Per-layer attention rules and the one registry of attention methods. Light: imports no JAX.

A model config holds a tuple of rules. Each rule is the options object of one method (its class is
the method's options class, so only that method's fields exist on it) plus `layers`, the layers it
covers; for a layer, the last rule that covers it wins. "Layers 0 and 1 dense, the rest Seer" is

    attention=(DenseOptions(), method_options("seer", layers="2:", topk=8))

From the command line, `model.attention.1.method=seer` turns rule 1 into a Seer rule with Seer's
defaults (keeping its `layers`), and `model.attention.1.topk=8` then sets a Seer field; a field the
method does not have fails with the list of the ones it has.

`METHODS` maps a method name to the module and options class that define it. Modules are imported
on first use, so `import configs` and `train.py --help` stay free of JAX; adding a method is one
line here (see sparsetrain/sparse/ for what the module provides).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, ClassVar, Literal

from sparsetrain.configbase import Config, ConfigError

# name -> "module:OptionsClass". The one registry: the dispatcher, FLOP counts, freezing, export
# and the conformance tests all go through it.
METHODS: dict[str, str] = {
    "dense": "sparsetrain.attention.spec:DenseOptions",
    "local": "sparsetrain.sparse.local:LocalOptions",
    "seer": "sparsetrain.sparse.seer:SeerOptions",
    "moba": "sparsetrain.sparse.moba:MobaOptions",
    "infllm_v2": "sparsetrain.sparse.infllm_v2:InfllmV2Options",
    "nsa": "sparsetrain.sparse.nsa:NsaOptions",
    "dma": "sparsetrain.sparse.dma:DmaOptions",
    "nosa": "sparsetrain.sparse.nosa:NosaOptions",
    "dsa": "sparsetrain.sparse.dsa:DsaOptions",
}

# Fields of the flat AttentionSpec that checkpoints written before per-method options carry on
# every rule; a method without them drops them when such a checkpoint loads.
_LEGACY_FIELDS = ("impl", "block_size", "local_blocks", "initial_blocks")


DENSE_TORCH_IMPL = "dense"


@dataclasses.dataclass(frozen=True)
class MethodExport:
    """How a method reaches PyTorch (sparsetrain/export/): the torch file
    `sparsetrain/export/torch/<torch_impl>.py` that implements it, the option fields its per-layer
    config.json entry carries, and its parameters: our path under the layer's `attn/attend/` ->
    (name under `model.layers.{i}.self_attn.attend.`, transform name in `export.mapping.TRANSFORMS`).
    """

    torch_impl: str
    fields: tuple[str, ...] = ()
    params: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
    torch_requires: tuple[str, ...] = ()   # other method files its torch file imports (shipped too)


def options_class(method: str) -> type["MethodOptions"]:
    """The options class registered for `method` (imports its module)."""
    if method not in METHODS:
        raise ConfigError(f"method={method!r} is not allowed; choose one of {sorted(METHODS)}")
    module, name = METHODS[method].split(":")
    return getattr(importlib.import_module(module), name)


def method_options(method: str, **fields) -> "MethodOptions":
    """A rule for `method` with its defaults and the given fields (`layers` and the method's own)."""
    cls = options_class(method)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise ConfigError(f"method {method!r} has no field(s) {unknown}; its fields: {', '.join(known)}")
    return cls(**fields)


def parse_layers(selector: str, num_layers: int) -> frozenset[int]:
    """Layer indices named by a selector: "all", "3", "0,1", "2:", ":4", "4:8" (slices as in Python)."""
    if selector.strip() == "all":
        return frozenset(range(num_layers))
    chosen: set[int] = set()
    for part in selector.split(","):
        part = part.strip()
        try:
            if ":" in part:
                lo, hi = part.split(":", 1)
                chosen.update(range(num_layers)[slice(int(lo) if lo else None, int(hi) if hi else None)])
            else:
                index = int(part)
                if not -num_layers <= index < num_layers:
                    raise ConfigError(f"layer {index} does not exist (model has {num_layers} layers)")
                chosen.add(index % num_layers)
        except ValueError:
            raise ConfigError(
                f"layers={selector!r}: use 'all', indices '0,1', or slices '2:', ':4', '4:8'") from None
    return frozenset(chosen)


@dataclasses.dataclass(frozen=True)
class MethodOptions(Config):
    """Base of every method's options: which layers the rule covers and which method it is.

    Subclasses set `method`'s default to their registered name and add their own fields. Beyond
    fields, a method's options say how to build its module (`build`), the share of causal attention
    work it does for FLOP counts (`density`), which parameters train (`param_policy`) and how it is
    exported (`export`).
    """

    layers: str = "all"          # layers this rule covers: all, 3, 0,1, 2:, :-1, 4:8
    method: str = "dense"        # setting it switches the rule to that method's options

    @property
    def param_policy(self) -> Literal["all", "own_only", "base_only"]:
        """How the trainer treats parameters while a layer uses this method: "all" trains
        everything; "own_only" trains only the method's parameters and freezes the whole base model
        (gate distillation); "base_only" freezes the method's parameters (they get no gradient)."""
        return "all"

    @property
    def causal_granularity(self) -> Literal["token", "block"]:
        """Outputs at position p depend on tokens up to p ("token"), or up to the end of p's block
        ("block", e.g. a gate pooling the whole query block). The conformance tests check it."""
        return "token"

    # How the method is exported to PyTorch; None: it cannot be exported yet.
    export: ClassVar["MethodExport | None"] = None
    # The K/V exchanges (`mesh.kv_exchange`) under which the method runs on a context split
    # (mesh.context > 1); empty: it is refused there by name. A method joins once
    # tests/train/context_parallel_methods_script.py checks it against one device.
    context_parallel: ClassVar[tuple[str, ...]] = ()

    def validate(self) -> None:
        registered = METHODS.get(self.method, "").split(":")[-1]
        self.require(registered == type(self).__name__, "method",
                     f"is set by the rule's class ({type(self).__name__}); to switch methods use "
                     f"method_options(name, ...) or `...attention.N.method=NAME` (choose one of "
                     f"{sorted(METHODS)})")
        parse_layers(self.layers, 1 << 20)  # syntax check; ranges are checked against the model later

    def with_field(self, name: str, value: Any) -> "MethodOptions":
        """Setting `method` switches to that method's options class with its defaults (keeping
        `layers`); any other field is set on this method's options."""
        if name == "method":
            if value == self.method:
                return self
            return options_class(value)(layers=self.layers)
        return super().with_field(name, value)

    @classmethod
    def class_for(cls, data: dict) -> type["MethodOptions"]:
        return options_class(data.get("method", "dense"))

    @classmethod
    def migrate(cls, data: dict) -> dict:
        """Checkpoints from before per-method options stored every rule with all of `_LEGACY_FIELDS`;
        keep only the ones this method has."""
        names = {f.name for f in dataclasses.fields(cls)}
        return {k: v for k, v in data.items() if k in names or k not in _LEGACY_FIELDS}

    def build(self, *, num_heads: int, num_kv_heads: int, head_dim: int, model_dim: int, rngs):
        """The NNX module that computes this layer's attention; model_dim is D, the width of the
        layer input `x` (methods that project it, such as NSA's gates, size their weights by it)."""
        raise NotImplementedError

    def export_params(self) -> dict[str, tuple[str, str]]:
        """The exported parameter table (`MethodExport.params`) of this rule; methods whose
        parameters depend on their options override it."""
        return self.export.params

    def density(self, seq_len: int) -> float:
        """Fraction of the causal attention work done at `seq_len` (1.0 = dense), for FLOP counts;
        methods that choose blocks at run time give their configured budget."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class DenseOptions(MethodOptions):
    """method="dense": exact causal attention (cuDNN on GPU, XLA elsewhere)."""

    method: str = "dense"
    impl: Literal["auto", "xla", "cudnn"] = "auto"   # auto: cuDNN on GPU for bf16/fp16, else XLA
    # BLASST (arXiv 2512.12087): None, or lambda in [0, 1): run the block-sparse kernel over every
    # causal tile, skipping those whose every row has exp(tile max - running max) < lambda
    # (metric "skipped"). Export ignores it (transformers' attention computes every tile).
    skip_threshold: float | None = None

    export = MethodExport(torch_impl=DENSE_TORCH_IMPL)   # transformers' own LlamaAttention
    context_parallel = ("all_gather", "ring")

    def validate(self) -> None:
        super().validate()
        self.require(self.skip_threshold is None or 0 <= self.skip_threshold < 1, "skip_threshold",
                     "must be None (off) or in [0, 1) (BLASST's lambda)")
        self.require(self.skip_threshold is None or self.impl != "cudnn", "impl",
                     "cudnn cannot skip tiles; with skip_threshold use auto or xla")

    def build(self, *, num_heads, num_kv_heads, head_dim, model_dim, rngs):
        # Imported here: this class must stay importable without JAX (configs, --help).
        from sparsetrain.attention.dense import DenseAttention
        return DenseAttention(self.impl, self.skip_threshold)

    def density(self, seq_len: int) -> float:
        return 1.0


def spec_for_layer(specs: tuple[MethodOptions, ...], layer: int, num_layers: int) -> MethodOptions:
    """The last rule covering `layer`."""
    chosen = None
    for spec in specs:
        if layer in parse_layers(spec.layers, num_layers):
            chosen = spec
    if chosen is None:
        raise ConfigError(f"model.attention: no rule covers layer {layer}; start with layers='all'")
    return chosen
