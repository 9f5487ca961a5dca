"""Corpus -> latents: the compressor, jitted with the batch axis sharded over a mesh, and a
resumable chunk-by-chunk build of an index.

The documents arrive as records `{'id', 'title'?, 'text'?}` plus a `tokenize` function that
frames a list of records for the compressor (`<ENC> BOS doc EOS`, right-padded) ->
(tokens int32[n, Td], mask bool[n, Td]); the data package provides it (`clara index build`
wires it), the tests pass token ids directly.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator

import jax
import numpy as np

from clara_jax.index.identity import model_identity
from clara_jax.index.index import IndexBuilder, LatentIndex, progress
from clara_jax.index.scann_index import ScannParams
from clara_jax.model import ModelConfig, compress, encode_query, param_shardings
from clara_jax.model.sharding import batch_sharding, make_mesh


def encode_fn(cfg: ModelConfig, mesh, query: bool = False):
    """The jitted encoder on `mesh`: (fn(params, tokens, mask) -> latents, the params'
    shardings, the tokens' and mask's sharding). `clara compile --what=encode` lowers the same
    function ahead of time."""
    param_sh = param_shardings(cfg, mesh)
    tok_sh = batch_sharding(mesh, 2)
    fn = encode_query if query else compress
    jitted = jax.jit(lambda p, t, m: fn(cfg, p, t, m), in_shardings=(param_sh, tok_sh, tok_sh),
                     out_shardings=batch_sharding(mesh, 3))
    return jitted, param_sh, tok_sh


class LatentEncoder:
    """`compress` under jit on a mesh (default: all local devices): params placed by their
    logical shardings, the batch axis of tokens/mask/latents sharded over (data, fsdp).

    batch_size is rounded up to a multiple of the mesh's batch devices; every call is padded
    to it, so one shape is compiled. `query=True` runs the query reasoner (`encode_query`)
    instead of the compressor, for searching an index."""

    def __init__(self, cfg: ModelConfig, params, batch_size: int = 64, mesh=None,
                 query: bool = False):
        self.cfg = cfg
        # Default: this host's devices. Index shards are built one per host, so each host
        # encodes its own documents without collectives across hosts.
        self.mesh = mesh if mesh is not None else make_mesh(devices=jax.local_devices())
        n_batch = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        self.batch_size = -(-batch_size // n_batch) * n_batch
        self._fn, param_sh, _ = encode_fn(cfg, self.mesh, query)
        self.params = jax.device_put(params, param_sh)

    def __call__(self, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """tokens int32[n, Td], mask bool[n, Td] (any n) -> latents float32[n, M, L]."""
        tokens, mask = np.asarray(tokens, np.int32), np.asarray(mask, bool)
        out = []
        for lo in range(0, len(tokens), self.batch_size):
            t, m = tokens[lo:lo + self.batch_size], mask[lo:lo + self.batch_size]
            n = len(t)
            if n < self.batch_size:  # pad rows are fully masked; their latents are dropped
                t = np.pad(t, ((0, self.batch_size - n), (0, 0)))
                m = np.pad(m, ((0, self.batch_size - n), (0, 0)))
            lat = self._fn(self.params, t, m)
            out.append(np.asarray(jax.device_get(lat), np.float32)[:n])
        m_, l_ = self.cfg.num_memory_tokens, self.cfg.latent_width
        return np.concatenate(out) if out else np.zeros((0, m_, l_), np.float32)


def _chunks(records: Iterable[dict], size: int) -> Iterator[list[dict]]:
    it = iter(records)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def build_index(out, cfg: ModelConfig, params, records: Iterable[dict],
                tokenize: Callable[[list[dict]], tuple[np.ndarray, np.ndarray]],
                dtype: str = "float32", key: str = "flat", chunk_size: int = 16384,
                batch_size: int = 64, mesh=None, scann: bool | ScannParams = True,
                shard: tuple[int, int] = (0, 1), total: int | None = None,
                keep_text: bool = True, identity: dict | None = None,
                extra: dict | None = None) -> LatentIndex:
    """Encodes `records` ({'id', 'title'?, 'text'?}) into a new index at `out`.

    Resumable: chunks committed by an interrupted run with the same model and settings are
    skipped without tokenizing or encoding them again. `identity` defaults to
    `model_identity(cfg, params)`; `total` (number of records) sizes the progress bar."""
    identity = identity or model_identity(cfg, params)
    builder = IndexBuilder(out, identity, dtype=dtype, key=key, chunk_size=chunk_size,
                           shard=shard)
    encoder = None
    num_chunks, skipped = 0, 0
    bar = progress(None, total=total, unit="doc", desc=f"encode {out}")
    try:
        for k, chunk in enumerate(_chunks(records, chunk_size)):
            num_chunks = k + 1
            if builder.chunk_done(k, [r["id"] for r in chunk]):
                skipped += 1
                bar.update(len(chunk))
                continue
            if encoder is None:  # compile only when there is something left to encode
                encoder = LatentEncoder(cfg, params, batch_size, mesh)
            latents = np.zeros((len(chunk), cfg.num_memory_tokens, cfg.latent_width), np.float32)
            for lo in range(0, len(chunk), encoder.batch_size):
                part = chunk[lo:lo + encoder.batch_size]
                tokens, mask = tokenize(part)
                latents[lo:lo + len(part)] = encoder(tokens, mask)
                bar.update(len(part))
            builder.write_chunk(
                k, latents, [r["id"] for r in chunk],
                titles=[r.get("title") for r in chunk] if keep_text else None,
                texts=[r.get("text") for r in chunk] if keep_text else None)
    finally:
        bar.close()
    if num_chunks == 0:
        raise ValueError(f"{out}: the corpus is empty")
    extra = dict(extra or {}, resumed_chunks=skipped)
    return builder.finalize(num_chunks, scann=scann, extra=extra)
