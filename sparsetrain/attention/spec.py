"""Per-layer attention specs: which method and implementation each layer's attention uses.

A model config holds a tuple of `AttentionSpec` rules. Each rule names the layers it covers; for a
layer, the last rule that covers it wins. So "layers 0,1 dense, the rest sparse" is

    attention=(AttentionSpec(layers="all", method="dense"),
               AttentionSpec(layers="2:", method="<sparse method>"))

and needs no code change. New methods add their name and implementations to `METHODS` and a builder
to the dispatcher (`sparsetrain/attention/dispatch.py`); a test keeps the two in step.
"""

from __future__ import annotations

import dataclasses
from pallas_kernels.block_sparse.common import BLOCK_SIZES
from sparsetrain.configbase import Config, ConfigError

# method -> implementations it accepts ("auto" picks by platform at trace time).
METHODS: dict[str, tuple[str, ...]] = {
    "dense": ("auto", "xla", "cudnn"),
    # Fixed block pattern, no parameters: the sliding window of `local_blocks` key blocks ending at
    # the diagonal plus `initial_blocks` sink blocks (sparsetrain/attention/local_blocks.py).
    "local": ("auto", "pallas", "xla"),
}


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
class AttentionSpec(Config):
    layers: str = "all"          # which layers this rule covers (see parse_layers)
    method: str = "dense"        # a key of METHODS
    impl: str = "auto"           # one of METHODS[method]
    block_size: int = 64         # sparse methods: tokens per selection block
    # Blocks every query block keeps whatever a method selects (generic, so selection methods
    # share them): the last `local_blocks` key blocks up to its own (the diagonal), and the first
    # `initial_blocks` key blocks (attention sinks).
    local_blocks: int = 1
    initial_blocks: int = 0

    def validate(self) -> None:
        self.require(self.method in METHODS, "method", f"choose one of {sorted(METHODS)}")
        self.require(self.impl in METHODS[self.method], "impl",
                     f"method {self.method!r} accepts {METHODS[self.method]}")
        self.require(self.block_size in BLOCK_SIZES, "block_size",
                     f"choose one of {BLOCK_SIZES} (the block-sparse kernel's tiles)")
        # At least the diagonal block, so that every query sees itself and no row is empty.
        self.require(self.local_blocks >= 1, "local_blocks", "must be >= 1 (the diagonal block)")
        self.require(self.initial_blocks >= 0, "initial_blocks", "must be >= 0")
        parse_layers(self.layers, 1 << 20)  # syntax check; ranges are checked against the model later


def spec_for_layer(specs: tuple[AttentionSpec, ...], layer: int, num_layers: int) -> AttentionSpec:
    """The last rule covering `layer`."""
    chosen = None
    for spec in specs:
        if layer in parse_layers(spec.layers, num_layers):
            chosen = spec
    if chosen is None:
        raise ConfigError(f"model.attention: no rule covers layer {layer}; start with layers='all'")
    return chosen

