"""Our parameter paths <-> Hugging Face Llama tensor names: one declarative table, named transforms.

`LLAMA` maps each of our path templates ("layers/{i}/attn/q_proj") to its Hugging Face key template
("model.layers.{i}.self_attn.q_proj.weight") and the transform between the two layouts. Export applies
`Transform.to_hf`, import applies `Transform.from_hf`; both go through `convert`, which checks that
every source tensor is used exactly once and every target name is produced once.

Our kernels keep heads as their own axis ([D, N, H] for q/k/v, [N, H, D] for o) and torch's
`nn.Linear.weight` is (out, in); RoPE is half-split in both, the softmax scale is head_dim**-0.5 in
both and GQA groups are contiguous in both, so every transform is a reshape plus a transpose.
Axis legend: D model width, N query heads, K kv heads, H head dim, F MLP width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import numpy as np

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Transform:
    """A named, invertible layout change. `to_hf(ours)`; `from_hf(theirs, our_shape)` (the target
    shape restores split axes such as heads, which the Hugging Face layout merges)."""

    name: str
    to_hf: Callable[[np.ndarray], np.ndarray]
    from_hf: Callable[[np.ndarray, Shape], np.ndarray]


def _merged_to_hf(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.reshape(x.shape[0], -1).T)


def _o_to_hf(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.reshape(-1, x.shape[-1]).T)


IDENTITY = Transform("identity", lambda x: x, lambda x, shape: x.reshape(shape))
# Flax (in, out) kernel -> torch (out, in) weight: MLP [D, F] -> (F, D), [F, D] -> (D, F); head [D, V] -> (V, D).
TRANSPOSE = Transform("transpose", lambda x: np.ascontiguousarray(x.T),
                      lambda x, shape: np.ascontiguousarray(x.T).reshape(shape))
# q/k/v [D, N, H] -> (N*H, D): heads-major flatten (row n*H + h is head n, channel h), then transpose.
MERGE_HEADS_TRANSPOSE = Transform("merge_heads_transpose", _merged_to_hf,
                                  lambda x, shape: np.ascontiguousarray(x.T).reshape(shape))
# o [N, H, D] -> (D, N*H): the same heads-major flatten on the input side.
O_TRANSPOSE = Transform("o_transpose", _o_to_hf, lambda x, shape: np.ascontiguousarray(x.T).reshape(shape))

# By name, for tables that cannot import this module (methods' `MethodExport.params`).
TRANSFORMS = {t.name: t for t in (IDENTITY, TRANSPOSE, MERGE_HEADS_TRANSPOSE, O_TRANSPOSE)}

# Our path template -> (Hugging Face key template, transform). "{i}" is the layer index.
LLAMA: dict[str, tuple[str, Transform]] = {
    "embed": ("model.embed_tokens.weight", IDENTITY),
    "layers/{i}/input_norm/scale": ("model.layers.{i}.input_layernorm.weight", IDENTITY),
    "layers/{i}/attn/q_proj": ("model.layers.{i}.self_attn.q_proj.weight", MERGE_HEADS_TRANSPOSE),
    "layers/{i}/attn/k_proj": ("model.layers.{i}.self_attn.k_proj.weight", MERGE_HEADS_TRANSPOSE),
    "layers/{i}/attn/v_proj": ("model.layers.{i}.self_attn.v_proj.weight", MERGE_HEADS_TRANSPOSE),
    "layers/{i}/attn/o_proj": ("model.layers.{i}.self_attn.o_proj.weight", O_TRANSPOSE),
    "layers/{i}/post_attn_norm/scale": ("model.layers.{i}.post_attention_layernorm.weight", IDENTITY),
    "layers/{i}/mlp/gate_proj": ("model.layers.{i}.mlp.gate_proj.weight", TRANSPOSE),
    "layers/{i}/mlp/up_proj": ("model.layers.{i}.mlp.up_proj.weight", TRANSPOSE),
    "layers/{i}/mlp/down_proj": ("model.layers.{i}.mlp.down_proj.weight", TRANSPOSE),
    "final_norm/scale": ("model.norm.weight", IDENTITY),
    "lm_head": ("lm_head.weight", TRANSPOSE),   # absent with tied embeddings
}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor: our flat path, its Hugging Face name, and the transform between them."""

    ours: str
    hf: str
    transform: Transform


def expand(table: dict[str, tuple[str, Transform]], layers: Iterable[int],
           skip: frozenset[str] = frozenset()) -> list[Entry]:
    """Entries of `table` with "{i}" templates instantiated for each of `layers`; templates in
    `skip` are left out (lm_head under tied embeddings)."""
    layers = list(layers)
    entries = []
    for ours, (hf, transform) in table.items():
        if ours in skip:
            continue
        indices = layers if "{i}" in ours else [None]
        entries += [Entry(ours.format(i=i), hf.format(i=i), transform) for i in indices]
    return entries


def _check_exactly_once(entries: list[Entry], available: Iterable[str], side: str, attr: str) -> None:
    names = [getattr(e, attr) for e in entries]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"the mapping uses these {side} names more than once: {duplicates}")
    missing = sorted(set(names) - set(available))
    unexpected = sorted(set(available) - set(names))
    if missing or unexpected:
        raise ValueError(f"{side} tensors do not match the mapping: missing {missing}, "
                         f"not consumed by any mapping entry {unexpected}")


def to_hf(params: dict[str, np.ndarray], entries: list[Entry]) -> dict[str, np.ndarray]:
    """Our flat params (per-layer paths) -> {Hugging Face name: array}, each param used exactly once."""
    _check_exactly_once(entries, params, "our", "ours")
    _check_exactly_once(entries, [e.hf for e in entries], "Hugging Face", "hf")
    return {e.hf: e.transform.to_hf(np.asarray(params[e.ours])) for e in entries}


def from_hf(tensors: dict[str, np.ndarray], entries: list[Entry],
            shapes: dict[str, Shape]) -> dict[str, np.ndarray]:
    """{Hugging Face name: array} -> our flat params with the given shapes, each tensor used exactly once."""
    _check_exactly_once(entries, tensors, "Hugging Face", "hf")
    out = {}
    for e in entries:
        x, shape = tensors[e.hf], tuple(shapes[e.ours])
        if x.size != int(np.prod(shape)):
            raise ValueError(f"{e.hf}: shape {tuple(x.shape)} does not fit our {e.ours} of shape {shape}")
        out[e.ours] = e.transform.from_hf(x, shape)
        if e.transform.to_hf(out[e.ours]).shape != x.shape:
            raise ValueError(f"{e.hf}: shape {tuple(x.shape)} is not the Hugging Face layout of our "
                             f"{e.ours} {shape} ({e.transform.name})")
    return out


def unstack_layers(params: dict[str, np.ndarray], num_layers: int) -> dict[str, np.ndarray]:
    """scan_layers params ("layers/attn/q_proj" [L, ...], stacked on axis 0) -> per-layer paths
    ("layers/{i}/attn/q_proj"); other paths pass through."""
    out = {}
    for path, x in params.items():
        if not path.startswith("layers/"):
            out[path] = x
            continue
        if x.shape[0] != num_layers:
            raise ValueError(f"{path}: scanned parameter has leading axis {x.shape[0]}, expected "
                             f"num_layers={num_layers}")
        rest = path[len("layers/"):]
        out.update({f"layers/{i}/{rest}": x[i] for i in range(num_layers)})
    return out


def stack_layers(params: dict[str, np.ndarray], num_layers: int) -> dict[str, np.ndarray]:
    """Inverse of `unstack_layers`."""
    out, stacked = {}, {}
    for path, x in params.items():
        parts = path.split("/", 2)
        if parts[0] == "layers":
            stacked.setdefault(parts[2], {})[int(parts[1])] = x
        else:
            out[path] = x
    for rest, by_layer in stacked.items():
        out[f"layers/{rest}"] = np.stack([by_layer[i] for i in range(num_layers)])
    return out
