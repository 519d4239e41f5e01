"""Device mesh and the logical-axis rules that place parameters, optimizer state and batches on it.

Mesh axes: "data" (pure data parallel: parameters replicated), "fsdp" (data parallel with parameters
and optimizer state sharded, all-gathered per layer), "context" (each sequence split along T,
sparsetrain/attention/context_parallel.py), "tensor" (heads/MLP width split). Axis types are
Auto so XLA's GSPMD propagates shardings through the step, as MaxText's `shard_mode: auto` does. The
logical-axis rules themselves live in `sparsetrain.partitioning`.
"""

from __future__ import annotations

import contextlib
import math

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from sparsetrain.attention.context_parallel import kv_exchange
from sparsetrain.config import MeshConfig
from sparsetrain.partitioning import LOGICAL_RULES, MESH_AXES, logical_to_spec


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, ...]:
    """Axis sizes in `MESH_AXES` order, the -1 axis filled in."""
    sizes = [getattr(cfg, axis) for axis in MESH_AXES]
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % fixed:
            raise ValueError(f"mesh: fixed axis sizes multiply to {fixed}, which does not divide "
                             f"the {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // fixed
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh: {'*'.join(MESH_AXES)} = {math.prod(sizes)} but there are {num_devices} "
                         "devices; set one axis to -1 or make the product match")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices=None) -> jax.sharding.Mesh:
    devices = devices if devices is not None else jax.devices()
    shape = mesh_shape(cfg, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


@contextlib.contextmanager
def on_mesh(mesh: jax.sharding.Mesh, cfg: MeshConfig):
    """Trace and run steps on `mesh` with the config's context-parallel K/V exchange (both are
    ambient while tracing: kernels read them to pick their per-shard form). The exchange is not
    part of jit's cache key: a function jitted once and called under two exchanges on the same mesh
    and shardings runs the first one's program; jit it anew per exchange."""
    with jax.set_mesh(mesh), kv_exchange(cfg.kv_exchange):
        yield


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


def placed_like(tree, shardings):
    """Abstract arrays (shape, dtype) of `tree` on `shardings`: what restoring or compiling for that
    placement needs."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)
