"""The model's static, hashable configuration (what Flax modules carry as an attribute)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import ml_collections


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int  # V
    dim: int  # D
    n_layers: int
    n_heads: int  # N
    n_kv_heads: int  # G
    head_dim: int  # H
    mlp_dim: int  # F
    num_memory_tokens: int  # M
    latent_dim: int = 0  # L; 0 means L = D (no projection)
    memory_layout: str = "append"  # where the compressor's memory tokens sit (clara.memory_order)
    compressor_attention: str = "causal"  # or "bidirectional" inside the compressor pass
    latent_span: int = 1  # RoPE positions one latent slot takes in the generator's prompt
    # Scale of the sub-position code added to the compressor's input embeddings (0: off) and
    # its period, data.compression_rate when on (clara.span_position_code).
    span_code: float = 0.0
    span_code_period: int = 1
    # R of the learned span read-out head (model.span_head: one L -> V map per sub-position,
    # a training signal for the compressor only); 0: none, the read-out has no parameters.
    span_head_rate: int = 0
    # R of the linear chunk write (model.chunk_write: latent j += the j-th R tokens' final
    # states, concatenated, times a learned [R, D, L] kernel); 0: off, the published write.
    chunk_write_rate: int = 0
    # The generator's copy path over the span read-outs (model.latent_copy; needs span_head).
    latent_copy: bool = False
    # The pointer's content term (model.copy_content).
    copy_content: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    qkv_bias: bool = False
    tie_embeddings: bool = False
    max_len: int = 4096
    scan_layers: bool = False
    remat: str = "none"
    dtype: str = "float32"
    base_dtype: str = "float32"  # storage dtype of the frozen base's params (param_group 'base')
    init_std: float = 0.02
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    adapters: tuple[str, ...] = ("compressor", "query", "generator")
    # Set by the train step when the base kernels train too (train.train_base): the kernel's
    # full gradient is computed anyway, and the adapters' follow from it cheaply.
    kernels_train: bool = False

    @property
    def latent_width(self) -> int:
        """L: the width of a latent vector."""
        return self.latent_dim or self.dim

    @property
    def projects_latents(self) -> bool:
        return self.latent_width != self.dim

    @property
    def lora_scale(self) -> float:
        """alpha / r: the factor on an adapter's A·B."""
        return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def base_param_dtype(self):
        """The dtype the base decoder's params are created and stored in."""
        return jnp.dtype(self.base_dtype)

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> ModelConfig:
        """From a finalized experiment config (`clara_jax.config.finalize`)."""
        m = config.model
        if m.num_memory_tokens <= 0:
            raise ValueError("config is not finalized: call clara_jax.config.finalize(config)")
        return cls(
            vocab_size=m.vocab_size, dim=m.dim, n_layers=m.n_layers, n_heads=m.n_heads,
            n_kv_heads=m.n_kv_heads, head_dim=m.head_dim, mlp_dim=m.mlp_dim,
            num_memory_tokens=m.num_memory_tokens, latent_dim=m.latent_dim,
            memory_layout=m.memory_layout, compressor_attention=m.compressor_attention,
            latent_span=(int(config.data.compression_rate)
                         if m.latent_positions == "spread" else 1),
            span_code=float(m.span_code),
            span_code_period=int(config.data.compression_rate) if m.span_code else 1,
            span_head_rate=int(config.data.compression_rate) if m.span_head else 0,
            chunk_write_rate=int(config.data.compression_rate) if m.chunk_write else 0,
            latent_copy=bool(m.latent_copy), copy_content=bool(m.copy_content),
            rope_theta=float(m.rope_theta), norm_eps=float(m.norm_eps), qkv_bias=m.qkv_bias,
            tie_embeddings=m.tie_embeddings, max_len=m.max_len, scan_layers=m.scan_layers,
            remat=m.remat, dtype=m.dtype, base_dtype=m.base_dtype, init_std=float(m.init_std),
            lora_rank=m.lora.rank, lora_alpha=float(m.lora.alpha),
            lora_dropout=float(m.lora.dropout), lora_targets=tuple(m.lora.targets),
            adapters=tuple(m.lora.adapters),
        )

    @staticmethod
    def config_setting(field: str, value) -> str:
        """The experiment-config setting for which `from_config` gives `field` = `value`, e.g.
        "model.latent_positions='spread'" for latent_span 16; "" for span_code_period 1, which
        follows model.span_code alone."""
        if field == "latent_span":
            return f"model.latent_positions={'spread' if value > 1 else 'packed'!r}"
        if field in ("span_head_rate", "chunk_write_rate"):
            return f"model.{field[:-len('_rate')]}={bool(value)}"
        if field == "span_code_period":  # follows model.span_code, at data.compression_rate
            return f"data.compression_rate={value}" if value > 1 else ""
        return f"model.{field}={value!r}"
