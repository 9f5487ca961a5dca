"""Latent index: corpus -> latents, a chunked on-disk latent store (float32 / bfloat16 / int8
with per-vector scales), an audit text store, ScaNN and exact search, shards (searched across
JAX processes in `multihost.py`), add / delete, and checkpoint-identity checks. See
`index.py` for the directory layout."""

from clara_jax.index.encode import LatentEncoder, build_index
from clara_jax.index.identity import config_hash, model_identity, params_checksum
from clara_jax.index.index import (
    IndexBuilder,
    LatentIndex,
    SearchResult,
    ShardedIndex,
    open_index,
    shard_dir_name,
)
from clara_jax.index.multihost import ProcessShardedIndex, assigned_shards
from clara_jax.index.scann_index import ScannIndex, ScannParams
from clara_jax.index.search import ExactSearcher, merge_ranked, merge_topk, retrieval_keys
from clara_jax.index.store import (
    INT8_REL_ERROR_BOUND,
    IndexFileError,
    IndexMismatchError,
    dequantize_int8,
    quantize_int8,
)

__all__ = [
    "INT8_REL_ERROR_BOUND", "ExactSearcher", "IndexBuilder", "IndexFileError",
    "IndexMismatchError", "LatentEncoder", "LatentIndex", "ProcessShardedIndex", "ScannIndex",
    "ScannParams", "SearchResult", "ShardedIndex", "assigned_shards", "build_index",
    "config_hash", "dequantize_int8", "merge_ranked", "merge_topk", "model_identity",
    "open_index", "params_checksum", "quantize_int8", "retrieval_keys", "shard_dir_name",
]
