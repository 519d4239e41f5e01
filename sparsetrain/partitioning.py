"""Logical axis names and the rules that map them onto the device mesh ("data", "fsdp", "context",
"tensor").

Models name the axes of their parameters and activations ("embed", "heads", "batch", ...); this is
the one table that says which mesh axes each name may be split over. It sits below `models/` so
layers can constrain activations, and below `sparsetrain/train/`, which places parameters with it.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import PartitionSpec as P

# "context" sits next to "tensor": both exchange activations every layer, so they get the devices
# closest together (the last mesh axes vary fastest over the device list).
MESH_AXES = ("data", "fsdp", "context", "tensor")

# logical axis -> mesh axes it may be split over, in order of preference.
LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "sequence": ("context",),    # activations' T axis (in the load-balanced order under context parallelism)
    "embed": ("fsdp",),          # parameters only: FSDP shards weights, activations keep full width
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "head_dim": (),
    "norm": (),
    "layers": (),
}


def logical_to_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh) -> P:
    """PartitionSpec for one array: each dim takes the mesh axes its rule names, if they divide it and
    no earlier dim already took them; otherwise that dim stays replicated (e.g. 4 kv heads on tensor=8)."""
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape):
        if name is not None and name not in LOGICAL_RULES:
            raise ValueError(f"unknown logical axis {name!r}; known: {sorted(LOGICAL_RULES)}")
        sizes = dict(mesh.shape)   # a mesh may lack an axis (a kernel test's own mesh): size 1
        chosen = tuple(a for a in LOGICAL_RULES.get(name, ()) if a not in used and sizes.get(a, 1) > 1)
        if chosen and dim % math.prod(sizes[a] for a in chosen) == 0:
            used.update(chosen)
            spec.append(chosen[0] if len(chosen) == 1 else chosen)
        else:
            spec.append(None)
    return P(*spec)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Pin an activation's sharding by logical axis names inside a mesh context; a no-op without one
    (single-device use, tests, export). Kernels with custom partitioners (cuDNN attention) need
    this: they refuse q, k, v that GSPMD happened to shard differently."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh))
