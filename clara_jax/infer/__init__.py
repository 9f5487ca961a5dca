"""Serving-side inference: jitted batched generation with a KV cache (`generation`), the RAG answer
pipeline in latent / text / closed-book modes with adaptive refinement (`rag`), and latent
inspection (`inspect`)."""

from clara_jax.infer.generation import (
    GREEDY,
    Generation,
    Generator,
    Sampling,
    answer_entropy,
    generate,
    generate_padded,
    generate_recompute,
    sample_next,
    trace_count,
)

__all__ = [
    "GREEDY", "Generation", "Generator", "Sampling", "answer_entropy", "generate",
    "generate_padded", "generate_recompute", "sample_next", "trace_count",
]
