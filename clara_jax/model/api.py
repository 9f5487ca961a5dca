"""Functional entry points over the CLaRa module: init, forward passes, parameter counts.

`params` is always the plain tree of arrays (no `{'params': ...}` wrapper, no logical-axis
boxes); `logical_specs` gives the matching tree of logical PartitionSpecs.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from clara_jax.model import sharding as sh
from clara_jax.model.clara import CLaRa
from clara_jax.model.config import ModelConfig
from clara_jax.param_store import path_keys


def _init_inputs(cfg: ModelConfig):
    m = cfg.num_memory_tokens
    doc = jnp.zeros((1, 4), jnp.int32)
    gen = jnp.zeros((1, m + 2), jnp.int32)
    slots = jnp.arange(m + 2)[None] < m
    return doc, jnp.ones((1, 4), bool), gen, jnp.ones((1, m + 2), bool), slots


@functools.lru_cache(maxsize=32)
def _boxed_abstract(cfg: ModelConfig):
    def init(rng):
        return CLaRa(cfg).init(rng, *_init_inputs(cfg))["params"]

    return jax.eval_shape(init, jax.random.key(0))


def abstract_params(cfg: ModelConfig):
    """The params tree as ShapeDtypeStructs; allocates nothing."""
    return nn.meta.unbox(_boxed_abstract(cfg))


def logical_specs(cfg: ModelConfig):
    """The tree of logical PartitionSpecs matching `abstract_params(cfg)`."""
    return nn.get_partition_spec(_boxed_abstract(cfg))


def param_shardings(cfg: ModelConfig, mesh):
    """NamedShardings on `mesh` matching `abstract_params(cfg)`: the logical rules
    (model/sharding.py), with a LoRA factor's axis left whole where the mesh does not divide
    it (`sharding.fit_specs`)."""
    specs = sh.fit_specs(logical_specs(cfg), abstract_params(cfg), mesh)
    return sh.logical_to_shardings(specs, mesh)


# XLA:CPU unrolls the random-number hashing of every leaf into hundreds of fusions: at the
# default LLVM optimisation level the tiny model's init took 14 s of CPU to compile, against
# 6 s at level 0. An init runs once, so only its compile time matters. A jit that calls
# init_params inside (with out_shardings, say) passes these options itself.
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def _init_params(cfg: ModelConfig, rng):
    return nn.meta.unbox(CLaRa(cfg).init(rng, *_init_inputs(cfg))["params"])


_init_params_jit = jax.jit(_init_params, static_argnums=0,
                           compiler_options=INIT_COMPILER_OPTIONS)


def init_params(cfg: ModelConfig, rng):
    """Fresh params (every adapter's B is zero), created in one compiled call (or traced into
    the caller's when called inside a jit)."""
    if isinstance(rng, jax.core.Tracer):  # options are only allowed on a top-level jit
        return _init_params(cfg, rng)
    return _init_params_jit(cfg, rng)


# Parameters that exist only under some options, some of a shape set by the rate.
OPTIONAL_PARAMS = ("span_head", "chunk_write", "copy_query", "copy_key", "copy_subpos",
                   "copy_gate", "copy_gate_bias", "copy_content_query", "copy_content_key",
                   "copy_previous_key")


def fit_optional_params(cfg: ModelConfig, params, seed: int):
    """`params` with the optional parameters `cfg` asks for (the span head, the chunk write, the
    copy path): fresh ones (as `init_params` draws them) where `params` has none of cfg's
    shape (made for another rate, or without them), none where cfg has none. Lets a start made
    without an option (or for another rate) begin a run that has it."""
    params = dict(params)
    shapes = abstract_params(cfg)
    missing = []
    for name in OPTIONAL_PARAMS:
        if name not in shapes:
            params.pop(name, None)
        elif name not in params or params[name].shape != shapes[name].shape:
            missing.append(name)
    if missing:
        # Only the missing ones leave the compiled init, so XLA computes nothing else: no
        # second copy of a 7B base to draw a span head.
        draw = jax.jit(lambda key: {n: _init_params(cfg, key)[n] for n in missing},
                       compiler_options=INIT_COMPILER_OPTIONS)
        params.update(draw(jax.random.key(seed)))
    return params


def _apply(cfg, params, method, *args, rng=None, **kwargs):
    rngs = None if rng is None else {"dropout": rng}
    return CLaRa(cfg).apply({"params": params}, *args, method=method, rngs=rngs, **kwargs)


def forward_logits(model_config: ModelConfig, params, tokens):
    """The plain decoder (no adapter). tokens: int32[B, T] -> logits float32[B, T, V]."""
    logits, _ = _apply(model_config, params, CLaRa.decode, tokens)
    return logits


def decode(cfg: ModelConfig, params, tokens, mask=None, cache=None, adapter=None, rng=None,
           last_logits_only=False):
    """tokens: int32[B, T]; mask: bool[B, T] -> (logits float32[B, T, V], new cache);
    logits float32[B, 1, V] of the last position with `last_logits_only`."""
    return _apply(cfg, params, CLaRa.decode, tokens, mask, cache, adapter,
                  deterministic=rng is None, last_logits_only=last_logits_only, rng=rng)


def compress(cfg: ModelConfig, params, tokens, mask, rng=None, with_means=False):
    """tokens: int32[B, T]; mask: bool[B, T] -> latents float[B, M, L]
    (plus doc and memory mean hidden states float32[B, D] with `with_means`)."""
    return _apply(cfg, params, CLaRa.compress, tokens, mask, deterministic=rng is None,
                  with_means=with_means, rng=rng)


def compress_docs(cfg: ModelConfig, params, doc_tokens, doc_mask):
    """Every example's K documents at once, no dropout. doc_tokens: int32[B, K, T];
    doc_mask: bool[B, K, T] -> latents float[B, K, M, L] (the generator's `latents`)."""
    b, k, t = doc_tokens.shape
    flat = compress(cfg, params, doc_tokens.reshape(b * k, t), doc_mask.reshape(b * k, t))
    return flat.reshape(b, k, *flat.shape[1:])


def span_permutations(dim: int, rate: int) -> jax.Array:
    """R fixed permutations of the D embedding dimensions (the identity first): int32[R, D].
    Seeded, so every run and every host binds sub-position r the same way."""
    key = jax.random.key(0x5BA7)
    return jnp.stack([jnp.arange(dim)] + [jax.random.permutation(jax.random.fold_in(key, r), dim)
                                          for r in range(1, rate)])


def latent_span_logits(cfg: ModelConfig, params, latents, rate: int):
    """Each latent's guess of the `rate` tokens it stands for. With `model.span_head`, the
    learned head (`CLaRa.span_logits`; its R must be `rate`). Otherwise with no parameters of
    its own: latent j as the generator receives it (projected back to width D), under the r-th
    fixed permutation of its dimensions (`span_permutations`), against the token embeddings,
    for r = 0..R-1; a latent holding its span's tokens as a sum of permuted embeddings scores
    them. latents: float[B, M, L] -> float32[B, M, R, V]."""
    if cfg.span_head_rate:
        if cfg.span_head_rate != rate:
            raise ValueError(f"the span head reads {cfg.span_head_rate} tokens a latent, the "
                             f"documents have {rate} (data.doc_max_len / M)")
        return _apply(cfg, params, CLaRa.span_logits, latents)
    lat = _apply(cfg, params, CLaRa.as_inputs, latents).astype(jnp.float32)  # [B, M, D]
    bound = lat[..., span_permutations(cfg.dim, rate)]  # [B, M, R, D]
    return bound @ params["decoder"]["embedding"].astype(jnp.float32).T


def encode_query(cfg: ModelConfig, params, tokens, mask, rng=None):
    """tokens: int32[B, T]; mask: bool[B, T] -> query latents float[B, M, L]."""
    return _apply(cfg, params, CLaRa.encode_query, tokens, mask, deterministic=rng is None,
                  rng=rng)


def generate_logits(cfg: ModelConfig, params, tokens, mask, slot_mask, latents, cache=None,
                    rng=None, last_logits_only=False, with_copied=False):
    """tokens, mask, slot_mask: [B, T]; latents: float[B, K, M, L]
    -> (logits float32[B, T, V] (or [B, 1, V] with `last_logits_only`), new cache or None),
    plus the copy path's own log-distribution float32[B, T, V] with `with_copied`
    (model.latent_copy)."""
    return _apply(cfg, params, CLaRa.generate, tokens, mask, slot_mask, latents, cache,
                  deterministic=rng is None, last_logits_only=last_logits_only,
                  with_copied=with_copied, rng=rng)


def param_group(path) -> str:
    """Which part of the model a parameter belongs to, from its tree path:
    'base' (the pretrained decoder), 'adapter:<name>', 'memory' (memory embeddings, the
    down-projection to latents, the span head and the chunk write: the compressor side) or
    'latent_up' (the generator side: the up-projection and the copy path's weights)."""
    keys = path_keys(path)
    leaf = keys[-1]
    if leaf.startswith("lora_"):
        return "adapter:" + leaf[len("lora_"):].rsplit("_", 1)[0]
    if keys[0] in ("memory_embeddings", "latent_down", "span_head", "chunk_write"):
        return "memory"
    if keys[0] == "latent_up" or keys[0].startswith("copy_"):
        return "latent_up"
    return "base"


def count_params(params) -> dict[str, int]:
    """Number of parameters per group (see `param_group`) and in total."""
    counts: dict[str, int] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        g = param_group(path)
        counts[g] = counts.get(g, 0) + math.prod(leaf.shape)
    counts["total"] = sum(counts.values())
    return dict(sorted(counts.items()))
