"""`clara demo --config=... --workdir=...`: compress a batch of documents into latents and
run the generator over them, printing shapes and parameter counts."""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
from absl import flags

from clara_jax.commands.common import define_config_flag, load_config
from clara_jax.model import ModelConfig, compress, count_params, generate_logits, init_params

define_config_flag()
flags.DEFINE_string("workdir", None, "Directory for the demo's outputs.")


def main(argv) -> None:
    del argv
    config = load_config()
    cfg = ModelConfig.from_config(config)
    k, m = config.data.num_docs, cfg.num_memory_tokens
    b, t = 2, config.data.doc_max_len
    key_params, key_docs, key_prompt = jax.random.split(jax.random.key(config.train.seed), 3)
    params = init_params(cfg, key_params)
    print("parameters:", json.dumps(count_params(params)))

    docs = jax.random.randint(key_docs, (b * k, t), 0, cfg.vocab_size)
    start = time.perf_counter()
    latents = jax.jit(lambda p, d: compress(cfg, p, d, jnp.ones(d.shape, bool)))(params, docs)
    latents = latents.reshape(b, k, m, cfg.latent_width)
    print(f"compress: docs int32{list(docs.shape)} -> latents {latents.dtype}"
          f"{list(latents.shape)} ({time.perf_counter() - start:.2f}s)")

    prompt_len = k * (m + 1) + 16
    tokens = jax.random.randint(key_prompt, (b, prompt_len), 0, cfg.vocab_size)
    slot = (jnp.arange(prompt_len) % (m + 1) < m) & (jnp.arange(prompt_len) < k * (m + 1))
    slot_mask = jnp.broadcast_to(slot, (b, prompt_len))
    logits, _ = jax.jit(lambda p, x, s, z: generate_logits(
        cfg, p, x, jnp.ones(x.shape, bool), s, z))(params, tokens, slot_mask, latents)
    print(f"generate: prompt int32{list(tokens.shape)} with {k}x{m} latent slots -> logits "
          f"{logits.dtype}{list(logits.shape)}; next tokens {jnp.argmax(logits[:, -1], -1)}")
