"""The bag-of-words loss the demo's pretraining used for the shipped start (runs 3-6 in its
pretrain.json, projects/demo/README.md): the memory tokens' latents, projected back to width D
and scored against the vocabulary embeddings, pooled over the M tokens, must name the
document's tokens; a signal for the compressor before the generator reads the latents. No
config of the library uses it: `projects.demo.pretrain.pretrain(bow_weight=...)` adds it to
the stage-1/2 loss through `make_train_step`'s `loss_fn`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from clara_jax.model import ModelConfig, api, compress
from clara_jax.model.clara import CLaRa
from clara_jax.train.steps import make_loss_fn


def bag_of_words_loss(token_logits, doc_tokens, doc_mask):
    """Cross-entropy from the document's token distribution (each distinct token of the
    document equally likely) to the softmax of the memory tokens' pooled vocabulary logits
    (log-sum-exp over the M memory tokens, so each token needs to be named by one of them).

    It gives the compressor a signal of its own that the latents must hold the document's
    content, before the generator has learnt to read them (from scratch, the generator's
    answer loss alone left small models' latents holding little but the subject's name).

    token_logits: float[B, M, V]; doc_tokens: int32[B, Td]; doc_mask: bool[B, Td]
    -> float32[] (mean over the rows with at least one valid token).
    """
    b, _, v = token_logits.shape
    pooled = jax.nn.logsumexp(token_logits.astype(jnp.float32), axis=1)  # [B, V]
    present = jnp.zeros((b, v), jnp.float32).at[jnp.arange(b)[:, None], doc_tokens].max(
        doc_mask.astype(jnp.float32))
    count = jnp.sum(present, axis=-1)
    target = present / jnp.maximum(count, 1.0)[:, None]
    per_row = -jnp.sum(target * jax.nn.log_softmax(pooled, axis=-1), axis=-1)
    w = (count > 0).astype(jnp.float32)
    return jnp.sum(per_row * w) / jnp.maximum(jnp.sum(w), 1.0)


def latent_token_logits(cfg: ModelConfig, params, latents):
    """How strongly each memory token's latent, as the generator receives it (projected back
    to width D), points at each vocabulary embedding. latents: float[..., M, L]
    -> float32[..., M, V]."""
    lat = api._apply(cfg, params, CLaRa.as_inputs, latents).astype(jnp.float32)
    return lat @ params["decoder"]["embedding"].astype(jnp.float32).T


def with_bag_of_words(config, stage: int, weight: float):
    """`make_train_step`'s `loss_fn`: the stage's loss + `weight` x `bag_of_words_loss` of the
    batch's documents (their latents computed again, without dropout: the demo's LoRA has
    none), reported as metric `bow`."""

    def factory(cfg: ModelConfig):
        stage_loss = make_loss_fn(config, cfg, stage)

        def loss(params, batch, rng):
            value, metrics = stage_loss(params, batch, rng)
            b, k, td = batch["doc_tokens"].shape
            doc_tokens = batch["doc_tokens"].reshape(b * k, td)
            doc_mask = batch["doc_mask"].reshape(b * k, td)
            flat = compress(cfg, params, doc_tokens, doc_mask)
            bow = bag_of_words_loss(latent_token_logits(cfg, params, flat), doc_tokens,
                                    doc_mask)
            value = value + weight * bow
            return value, dict(metrics, loss=value, bow=bow)

        return loss

    return factory
