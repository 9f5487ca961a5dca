"""Serving bundles: a trained checkpoint, its tokenizer, config and latent index in one
self-contained directory (`clara export`), loadable with no training workdir."""

from clara_jax.export.bundle import Bundle, BundleError, export_bundle, load_bundle

__all__ = ["Bundle", "BundleError", "export_bundle", "load_bundle"]
