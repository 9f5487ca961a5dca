"""Checkpoint identity: which compressor produced an index's latents.

An index records two hashes, and opening it with a model refuses a mismatch:

- `config_hash`: sha256 over the canonical JSON of the `ModelConfig` fields that change what
  `compress` computes. Fields that only change how it runs (`remat`, `scan_layers`,
  `max_len`, `lora_dropout`, which is off at inference) are left out, so re-running a
  checkpoint with a different memory policy keeps its indexes valid.
- `params_checksum`: sha256 over the bytes of the parameters `compress` reads, i.e. the groups
  `COMPRESSOR_GROUPS` of `clara_jax.model.param_group`: the base decoder, the `compressor`
  adapter, the memory embeddings and the down-projection. The `query` and `generator` adapters
  and `latent_up` are excluded: stage 3 trains them with the compressor frozen, and the
  latents (so the index) stay valid. Leaves are visited in sorted canonical-path order; a
  stacked `layers` tree (`scan_layers=True`) is split into `layers_{i}` first, so both layouts
  hash the same. Each leaf contributes its path, dtype, shape and its little-endian C-order
  bytes, cast to float32.

Cost: one pass over the compressor's parameters (about 1 GB/s of sha256 on a CPU core).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import jax
import numpy as np
from jax.experimental import multihost_utils

from clara_jax.model import ModelConfig, param_group
from clara_jax.param_store import path_keys

COMPRESSOR_GROUPS = frozenset({"base", "adapter:compressor", "memory"})
# ModelConfig fields that do not change the latents `compress` returns.
RUNTIME_ONLY_FIELDS = frozenset({"remat", "scan_layers", "max_len", "lora_dropout"})
IDENTITY_VERSION = 1


def config_fields(cfg: ModelConfig) -> dict:
    """The ModelConfig fields that define the compressor's function, JSON-ready."""
    out = {}
    for f in dataclasses.fields(cfg):
        if f.name in RUNTIME_ONLY_FIELDS:
            continue
        v = getattr(cfg, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def config_hash(cfg: ModelConfig) -> str:
    """sha256 hex digest of `config_fields(cfg)` as canonical JSON (sorted keys)."""
    blob = json.dumps(config_fields(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _canonical_leaves(params):
    """(path string, numpy array) for every compressor leaf, layers unstacked, sorted."""
    out = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if param_group(path) not in COMPRESSOR_GROUPS:
            continue
        keys = path_keys(path)
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            # Params sharded across hosts: every host hashes the same gathered bytes.
            leaf = multihost_utils.process_allgather(leaf, tiled=True)
        arr = np.asarray(jax.device_get(leaf))
        if len(keys) > 1 and keys[0] == "decoder" and keys[1] == "layers":
            # scan_layers stacks every layer's leaf on axis 0.
            for i in range(arr.shape[0]):
                out.append(("/".join(("decoder", f"layers_{i}") + keys[2:]), arr[i]))
        else:
            out.append(("/".join(keys), arr))
    out.sort(key=lambda kv: kv[0])
    return out


def params_checksum(params) -> str:
    """sha256 hex digest of the compressor's parameters (see the module docstring)."""
    h = hashlib.sha256()
    for name, arr in _canonical_leaves(params):
        a = np.ascontiguousarray(arr, dtype="<f4")
        h.update(f"{name}|float32|{list(a.shape)}\n".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def model_identity(cfg: ModelConfig, params) -> dict:
    """What an index stores about the model that built it:
    {'version', 'config_hash', 'params_checksum', 'num_memory_tokens', 'latent_width'}."""
    return {
        "version": IDENTITY_VERSION,
        "config_hash": config_hash(cfg),
        "params_checksum": params_checksum(params),
        "num_memory_tokens": cfg.num_memory_tokens,
        "latent_width": cfg.latent_width,
    }
