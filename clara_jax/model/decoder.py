"""Llama / Mistral / Qwen2 family decoder, used functionally through `Decoder.apply`.

One code path serves training (no cache), prefill and one-token decode (with a cache): new
keys and values are written at `cache['index']`, and queries attend over the whole cache under
a causal + padding mask. RoPE positions count only valid tokens, so left- or right-padded rows
get the same positions as unpadded ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from clara_jax.model import sharding as sh
from clara_jax.model.config import ModelConfig
from clara_jax.model.layers import (
    MLP,
    PROJECTION,
    Attention,
    RMSNorm,
    attention_mask,
    base_init,
    contract_last,
)

REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole block
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    # The q/k/v/o/gate/up/down outputs in the compute dtype (bfloat16 for 7B), adapters added;
    # norms, RoPE, attention, SwiGLU and the adapters' thin matmuls are recomputed. The dots
    # policies save every matmul's float32 result instead, the LoRA ones included.
    "projections": jax.checkpoint_policies.save_only_these_names(PROJECTION),
}


class Block(nn.Module):
    """Pre-norm transformer block. The adapter and dropout mode are attributes so the block can
    be scanned and rematerialised without static arguments.

    carry: (x float[B, T, D], the all-layer (k, v) cache or None); layer: this block's index.
    Returns (carry, None), the shape `nn.scan` wants.
    """

    cfg: ModelConfig
    adapter: str | None = None
    deterministic: bool = True

    @nn.compact
    def __call__(self, carry, layer, positions, mask, write_index):
        cfg = self.cfg
        x, cache = carry
        x = nn.with_logical_constraint(x, (sh.BATCH, sh.LENGTH, sh.ACT_EMBED))
        h = RMSNorm(cfg.norm_eps, cfg.compute_dtype, cfg.base_param_dtype, name="attn_norm")(x)
        h, cache = Attention(cfg, name="attn")(h, positions, mask, cache, layer, write_index,
                                               self.adapter, self.deterministic)
        x = x + h
        h = RMSNorm(cfg.norm_eps, cfg.compute_dtype, cfg.base_param_dtype, name="mlp_norm")(x)
        x = x + MLP(cfg, name="mlp")(h, self.adapter, self.deterministic)
        return (x, cache), None


def _block_class(cfg: ModelConfig):
    if cfg.remat == "none":
        return Block
    return nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
    """An empty KV cache for `batch` rows of up to `max_len` tokens.

    {'k','v': float[layers, B, S, G, H], 'valid': bool[B, S], 'index': int32[],
     'next_position': int32[B] (the RoPE position the row's next token gets)}
    """
    dtype = cfg.compute_dtype if dtype is None else dtype
    shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "valid": jnp.zeros((batch, max_len), bool), "index": jnp.zeros((), jnp.int32),
            "next_position": jnp.zeros((batch,), jnp.int32)}


def rope_positions(mask, seen, inject_mask=None, inject_span: int = 1):
    """The RoPE positions the decoder gives a row: mask bool[B, T]; seen int32[B] (positions
    a cache already holds); inject_mask bool[B, T] marks positions taking `inject_span` each ->
    (positions int32[B, T], ends int32[B, T]: the count after each position)."""
    width = mask.astype(jnp.int32)
    if inject_span != 1 and inject_mask is not None:
        width = jnp.where(inject_mask & mask, inject_span, width)
    ends = jnp.cumsum(width, axis=1, dtype=jnp.int32)
    return jnp.maximum(seen[:, None] + ends - width, 0), ends


class Decoder(nn.Module):
    """tokens: int32[B, T]; mask: bool[B, T] (False = padding);
    inject: float[B, T, D] replaces the token embedding where inject_mask: bool[B, T] is True;
    input_offsets: float[B, T, D] is then added to every input embedding (no cache);
    each injected position takes `inject_span` RoPE positions (a latent standing for that many
    tokens of text), every other valid token one, unless positions: int32[B, T] gives them
    (no cache); `causal=False` lets every token attend to every valid token (no cache);
    cache: from `init_cache` or None.
    Returns (logits float32[B, T, V] (float32[B, 1, V] with `last_logits_only`) or None,
    hidden float[B, T, D] after the final norm, new cache or None).
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens, mask=None, inject=None, inject_mask=None, cache=None,
                 adapter: str | None = None, deterministic: bool = True,
                 return_logits: bool = True, last_logits_only: bool = False,
                 inject_span: int = 1, positions=None, causal: bool = True,
                 input_offsets=None):
        cfg = self.cfg
        b, t = tokens.shape
        if mask is None:
            mask = jnp.ones((b, t), bool)
        embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(base_init(nn.initializers.normal(cfg.init_std)),
                                         (sh.VOCAB, sh.EMBED)),
            (cfg.vocab_size, cfg.dim), cfg.base_param_dtype)
        x = jnp.take(embedding, tokens, axis=0).astype(cfg.compute_dtype)
        if inject is not None:
            x = jnp.where(inject_mask[..., None], inject.astype(x.dtype), x)
        if input_offsets is not None:
            x = x + input_offsets.astype(x.dtype)

        if cache is None:
            seen = jnp.zeros((b,), jnp.int32)
            write_index = jnp.zeros((), jnp.int32)
            key_valid = mask
        else:
            seen = cache["next_position"]
            write_index = cache["index"]
            key_valid = lax.dynamic_update_slice(cache["valid"], mask, (0, write_index))
        counted, ends = rope_positions(mask, seen, inject_mask, inject_span)
        if positions is None:
            positions = counted
        attn_mask = attention_mask(key_valid, write_index, t)
        if not causal:  # every valid token sees every other (no cache)
            attn_mask = jnp.broadcast_to(key_valid[:, None, :], attn_mask.shape)

        block = _block_class(cfg)
        carry = (x, None if cache is None else (cache["k"], cache["v"]))
        if cfg.scan_layers:
            scanned = nn.scan(
                block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.n_layers,
                metadata_params={nn.PARTITION_NAME: sh.LAYERS})
            carry, _ = scanned(cfg, adapter, deterministic, name="layers")(
                carry, jnp.arange(cfg.n_layers), positions, attn_mask, write_index)
        else:
            for i in range(cfg.n_layers):
                carry, _ = block(cfg, adapter, deterministic, name=f"layers_{i}")(
                    carry, i, positions, attn_mask, write_index)
        x, kv = carry

        hidden = RMSNorm(cfg.norm_eps, cfg.compute_dtype, cfg.base_param_dtype,
                         name="final_norm")(x)
        new_cache = None
        if cache is not None:
            new_cache = {"k": kv[0], "v": kv[1], "valid": key_valid, "index": write_index + t,
                         "next_position": seen + ends[:, -1]}
        if not return_logits:
            return None, hidden, new_cache
        # Generation's prefill needs only the next-token distribution, not [B, T, V].
        h = hidden[:, -1:] if last_logits_only else hidden
        if cfg.tie_embeddings:
            logits = contract_last(h, embedding.astype(h.dtype).T, 1, jnp.float32)
        else:
            unembed = self.param(
                "unembed",
                nn.with_logical_partitioning(base_init(nn.initializers.normal(cfg.init_std)),
                                             (sh.EMBED, sh.VOCAB)),
                (cfg.dim, cfg.vocab_size), cfg.base_param_dtype)
            logits = contract_last(h, unembed.astype(h.dtype), 1, jnp.float32)
        return logits, hidden, new_cache
