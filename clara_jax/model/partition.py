"""Frozen base weights and trainable parts, separated by an optax partition (no tree copies).

Frozen leaves go through `optax.set_to_zero()`, which keeps no optimizer state for them.
"""

from __future__ import annotations

import jax
import optax

from clara_jax.model.api import param_group

# What each training stage updates (docs/design.md): the compressor side and the generator in
# stages 1-2; the query reasoner and the generator in stage 3, the compressor frozen.
STAGE_TRAINABLE = {
    1: frozenset({"adapter:compressor", "adapter:generator", "memory", "latent_up"}),
    2: frozenset({"adapter:compressor", "adapter:generator", "memory", "latent_up"}),
    3: frozenset({"adapter:query", "adapter:generator", "latent_up"}),
}


def param_labels(params, trainable: frozenset[str]):
    """A tree of 'trainable' / 'frozen' labels matching `params`."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "trainable" if param_group(path) in trainable else "frozen", params)


def partition(tx: optax.GradientTransformation, params,
              trainable: frozenset[str]) -> optax.GradientTransformation:
    """Applies `tx` to the trainable leaves and zero updates to the frozen ones."""
    return optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()},
                                 param_labels(params, trainable))
