"""Logical axis names of parameters and activations, and the rules mapping them to the mesh.

Every parameter is created with logical names (e.g. `('embed', 'mlp')`); the rules below
turn them into mesh axes `data`, `fsdp`, `tensor`. Activations use their own `act_*` names so
that a weight's `embed` axis can be sharded over `fsdp` while activations keep it whole.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Parameter axes.
VOCAB = "vocab"
EMBED = "embed"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
MLP = "mlp"
LAYERS = "layers"
LORA_RANK = "lora_rank"
# A LoRA factor's non-rank axes where the base kernel's name would leave it unsharded with
# tensor=1 (heads, mlp): the factors and their Adam moments then shard over fsdp like the
# kernels, instead of sitting whole on every device (0.7 GiB for Mistral-7B's three adapters).
LORA_HEAD_DIM = "lora_head_dim"
LORA_MLP = "lora_mlp"
LATENT = "latent"
MEMORY = "memory"
# Activation axes.
BATCH = "batch"
LENGTH = "length"
ACT_EMBED = "act_embed"
ACT_HEADS = "act_heads"
ACT_MLP = "act_mlp"

DEFAULT_RULES: tuple[tuple[str, object], ...] = (
    (BATCH, ("data", "fsdp")),
    (EMBED, "fsdp"),
    (VOCAB, "tensor"),
    (HEADS, "tensor"),
    (KV_HEADS, "tensor"),
    (MLP, "tensor"),
    (ACT_HEADS, "tensor"),
    (ACT_MLP, "tensor"),
    (ACT_EMBED, None),
    (LENGTH, None),
    (HEAD_DIM, None),
    (LAYERS, None),
    (LORA_RANK, None),  # r is small (16): its factors shard on their other axis
    (LORA_HEAD_DIM, "fsdp"),
    # tensor major: each tensor shard's block of F is then contiguous, so gathering over fsdp
    # gives the activations' tensor layout (fsdp major would need an all-to-all).
    (LORA_MLP, ("tensor", "fsdp")),
    (LATENT, None),
    (MEMORY, None),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (all by default); one size may be -1."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    known = math.prod(s for s in sizes if s != -1)
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh "
                             f"{dict(zip(MESH_AXES, sizes))}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                         f"have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_to_shardings(logical_specs, mesh: Mesh, rules=DEFAULT_RULES):
    """Maps a tree of logical PartitionSpecs to NamedShardings on `mesh`."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


# Logical axes that fall back to unsharded on a mesh they do not divide evenly (jax refuses
# uneven shardings): a LoRA factor's head_dim or mlp axis on a large fsdp, e.g. head_dim 128
# over fsdp=256, where the base kernels' embed axis still divides.
DIVISIBLE_OR_WHOLE = (LORA_HEAD_DIM, LORA_MLP)


def mesh_size(name: str, mesh: Mesh, rules=DEFAULT_RULES) -> int:
    """How many ways logical axis `name` is split on `mesh` under `rules` (1 if unmapped)."""
    axes = dict(rules).get(name)
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(int(mesh.shape[a]) for a in axes)


def fit_specs(logical_specs, shapes, mesh: Mesh, rules=DEFAULT_RULES):
    """`logical_specs` with every DIVISIBLE_OR_WHOLE axis that `mesh` does not divide evenly
    (in `shapes`, a matching tree of arrays or ShapeDtypeStructs) replaced by None."""
    def fit(spec, shape):
        return PartitionSpec(*(
            None if name in DIVISIBLE_OR_WHOLE and shape.shape[i] % mesh_size(name, mesh, rules)
            else name for i, name in enumerate(spec)))

    return jax.tree.map(fit, logical_specs, shapes,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: Mesh, ndim: int, rules=DEFAULT_RULES) -> NamedSharding:
    """Sharding of an array whose leading axis is the batch and the rest replicated."""
    spec = nn.logical_to_mesh_axes((BATCH,) + (None,) * (ndim - 1), rules)
    return NamedSharding(mesh, PartitionSpec(*spec))
