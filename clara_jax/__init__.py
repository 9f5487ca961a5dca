"""clara_jax: a JAX/Flax stack for compressed-latent retrieval-augmented generation (CLaRa)."""

__version__ = "0.1.0"
