"""Decoder, LoRA adapters and the CLaRa module, with a functional API over them."""

from clara_jax.model.api import (
    OPTIONAL_PARAMS,
    abstract_params,
    compress,
    compress_docs,
    count_params,
    decode,
    encode_query,
    fit_optional_params,
    forward_logits,
    generate_logits,
    init_params,
    latent_span_logits,
    logical_specs,
    param_group,
    param_shardings,
)
from clara_jax.model.clara import CLaRa
from clara_jax.model.config import ModelConfig
from clara_jax.model.decoder import Decoder, init_cache

__all__ = [
    "OPTIONAL_PARAMS", "CLaRa", "Decoder", "ModelConfig", "abstract_params", "compress",
    "compress_docs", "count_params", "decode", "encode_query", "fit_optional_params",
    "forward_logits", "generate_logits", "init_cache", "init_params", "latent_span_logits",
    "logical_specs", "param_group", "param_shardings",
]
