"""Reading and writing parameter trees: the one place that names a leaf, flattens a tree, and
stores it as safetensors (float, or int8 rows for shipping) or as an orbax params-only
checkpoint. The training state (params + optimizer + data iterator) is `train/checkpoint.py`;
Hugging Face layouts are `convert/hf.py`, which reads and writes through the names here.

A leaf's name is its dict keys joined by "/": "decoder/layers_0/attn/q/kernel".
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

SCALE_SUFFIX = ".scale"
INT8_FORMAT = "int8 rows"


def path_keys(path) -> tuple[str, ...]:
    """A `tree_leaves_with_path` path as its keys: ('decoder', 'layers_0', ...)."""
    return tuple(str(getattr(k, "key", k)) for k in path)


def path_name(path) -> str:
    """A `tree_leaves_with_path` path as one name: 'decoder/layers_0/attn/q/kernel'."""
    return "/".join(path_keys(path))


def flatten(params) -> dict[str, np.ndarray]:
    """{name: host array} for every leaf (bfloat16 stays bfloat16)."""
    return {path_name(p): np.asarray(jax.device_get(x))
            for p, x in jax.tree_util.tree_leaves_with_path(params)}


def unflatten_like(flat: dict, like, source) -> dict:
    """The tree `like` (arrays or ShapeDtypeStructs) filled from `flat`, each leaf cast to
    like's dtype. Every leaf must be there with its shape and nothing else may be; otherwise a
    ValueError names `source` and the first tensor that is wrong."""
    names = set()

    def fill(path, want):
        name = path_name(path)
        names.add(name)
        if name not in flat:
            raise ValueError(f"{source}: no tensor {name!r} (the model needs {want.shape})")
        if tuple(flat[name].shape) != tuple(want.shape):
            raise ValueError(f"{source}: tensor {name!r} has shape {flat[name].shape}, "
                             f"the model needs {want.shape}")
        return jnp.asarray(flat[name], want.dtype)

    tree = jax.tree_util.tree_map_with_path(fill, like)
    extra = set(flat) - names
    if extra:
        raise ValueError(f"{source}: tensors the model does not have: {sorted(extra)[:5]}")
    return tree


def quantize_int8(flat: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float]:
    """Each tensor of 2+ axes as int8 with one float32 scale per index of its first axis (a row
    of the embedding, an input feature of a kernel) under name + SCALE_SUFFIX; norms and
    biases stay as they are. Returns (tensors, largest absolute error)."""
    out, worst = {}, 0.0
    for name, x in flat.items():
        if x.ndim < 2:
            out[name] = x
            continue
        rows = x.reshape(x.shape[0], -1).astype(np.float32)
        scale = np.maximum(np.abs(rows).max(axis=1), 1e-12).astype(np.float32) / 127.0
        q = np.clip(np.rint(rows / scale[:, None]), -127, 127).astype(np.int8)
        out[name], out[name + SCALE_SUFFIX] = q.reshape(x.shape), scale
        worst = max(worst, float(np.abs(q * scale[:, None] - rows).max()))
    return out, worst


def dequantize_int8(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of `quantize_int8` (float32 for quantized tensors); plain tensors pass."""
    out = {}
    for name, x in flat.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        scale = flat.get(name + SCALE_SUFFIX)
        if scale is not None:
            x = (x.reshape(x.shape[0], -1).astype(np.float32) * scale[:, None]).reshape(x.shape)
        out[name] = x
    return out


def save_safetensors(tensors: dict[str, np.ndarray], path, metadata: dict | None = None,
                     int8: bool = False) -> dict:
    """Writes {name: array} (see `flatten`) as one safetensors file, atomically (a temporary
    file, then rename). int8: store `quantize_int8` rows (a quarter of the bytes).
    metadata values are JSON-encoded. Returns {"bytes", "max_abs_error"}."""
    worst = 0.0
    metadata = dict(metadata or {})
    if int8:
        tensors, worst = quantize_int8(tensors)
        metadata["format"] = INT8_FORMAT
    # safetensors' numpy writer has no bfloat16.
    tensors = {k: np.ascontiguousarray(v.astype(np.float32) if v.dtype.name == "bfloat16" else v)
               for k, v in tensors.items()}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={k: json.dumps(v) for k, v in metadata.items()})
    os.replace(tmp, path)
    return {"bytes": path.stat().st_size, "max_abs_error": worst}


def load_safetensors(path) -> dict[str, np.ndarray]:
    """{name: array} from a `save_safetensors` file, int8 rows dequantized to float32."""
    return dequantize_int8(load_file(str(path)))


def save_orbax(directory, params) -> None:
    """The params tree as an orbax params-only checkpoint in `directory` (which must not
    exist; orbax writes to a temporary name and renames it when complete)."""
    # orbax (with tensorstore) is imported by the two functions that use it, not with this
    # module: every model import loads param_store, and most never touch a checkpoint.
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(Path(directory).absolute(), params)
        ckptr.wait_until_finished()


def load_orbax(directory, abstract, shardings=None):
    """The params tree stored by `save_orbax`, restored onto `shardings` (a tree matching
    `abstract`, default the host CPU). The stored dtypes win over `abstract`'s (a base
    written as bfloat16 comes back bfloat16). FileNotFoundError when `directory` is missing."""
    import orbax.checkpoint as ocp  # lazy: see save_orbax

    directory = Path(directory).absolute()
    if not directory.exists():
        raise FileNotFoundError(f"{directory}: no such directory")
    if shardings is None:
        cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
        shardings = jax.tree.map(lambda _: cpu, abstract)
    with ocp.StandardCheckpointer() as ckptr:
        stored = ckptr.metadata(directory).item_metadata.tree
        target = jax.tree.map(lambda a, s, m: jax.ShapeDtypeStruct(a.shape, m.dtype, sharding=s),
                              abstract, shardings, stored)
        return ckptr.restore(directory, target)
