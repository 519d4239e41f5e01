"""Device mesh and the logical-axis rules that place parameters, optimizer state and batches on it.

Mesh axes: "data" (pure data parallel: parameters replicated), "fsdp" (data parallel with parameters
and optimizer state sharded, all-gathered per layer), "tensor" (heads/MLP width split). Axis types are
Auto so XLA's GSPMD propagates shardings through the step, as MaxText's `shard_mode: auto` does.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from sparsetrain.config import MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis (models/layers.py) -> mesh axes it may be split over, in order of preference.
LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "head_dim": (),
    "norm": (),
    "layers": (),
}


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % fixed:
            raise ValueError(f"mesh: fixed axis sizes multiply to {fixed}, which does not divide "
                             f"the {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // fixed
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh: data*fsdp*tensor = {math.prod(sizes)} but there are {num_devices} "
                         "devices; set one axis to -1 or make the product match")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices=None) -> jax.sharding.Mesh:
    devices = devices if devices is not None else jax.devices()
    shape = mesh_shape(cfg, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def logical_to_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh) -> P:
    """PartitionSpec for one array: each dim takes the mesh axes its rule names, if they divide it and
    no earlier dim already took them; otherwise that dim stays replicated (e.g. 4 kv heads on tensor=8)."""
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape):
        if name is not None and name not in LOGICAL_RULES:
            raise ValueError(f"unknown logical axis {name!r}; known: {sorted(LOGICAL_RULES)}")
        chosen = tuple(a for a in LOGICAL_RULES.get(name, ()) if a not in used and mesh.shape[a] > 1)
        if chosen and dim % math.prod(mesh.shape[a] for a in chosen) == 0:
            used.update(chosen)
            spec.append(chosen[0] if len(chosen) == 1 else chosen)
        else:
            spec.append(None)
    return P(*spec)


def param_shardings(logical_axes, abstract_params, mesh):
    """NamedSharding per parameter from the model's logical axis annotations."""
    return jax.tree.map(lambda axes, a: NamedSharding(mesh, logical_to_spec(axes, a.shape, mesh)),
                        logical_axes, abstract_params, is_leaf=lambda x: isinstance(x, tuple))


def batch_sharding(mesh) -> NamedSharding:
    """[B, T] batches are split over every data-parallel axis."""
    return NamedSharding(mesh, P(LOGICAL_RULES["batch"]))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """Assemble each process's slice of the batch into one global, sharded array per key."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
