"""Everything inference needs from a training run: its config, params and tokenizer.

A run's checkpoints (clara_jax.train.checkpoint) carry the experiment config in their metadata;
the tokenizer is the one the run's data was built with (DATA_DIR/tokenizer, found through the
config's train.data_dir) unless a tokenizer directory is given.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections

from clara_jax.config import finalize
from clara_jax.data.tokenizer import (
    Tokenizer,
    TokenizerError,
    check_tokenizer_fits,
    load_or_import_tokenizer,
)
from clara_jax.model import ModelConfig
from clara_jax.model.sharding import make_mesh


class LoadError(ValueError):
    """A checkpoint or tokenizer cannot be used for inference; the message names the path."""


def _config_from_meta(meta: dict, where: str) -> ml_collections.ConfigDict:
    raw = meta.get("config")
    if raw is None:
        raise LoadError(f"{where}: checkpoint metadata has no field 'config'")
    try:
        config = ml_collections.ConfigDict(json.loads(raw) if isinstance(raw, str) else raw)
    except (TypeError, ValueError) as e:
        raise LoadError(f"{where}: field 'config' of the checkpoint metadata: {e}") from None
    return finalize(config)


def load_checkpoint(checkpoint, mesh=None):
    """The latest checkpoint under `checkpoint` (a run's workdir or its checkpoints dir).

    Returns (config: the finalized experiment config the run trained with, cfg: ModelConfig,
    params: restored onto the logical shardings of `mesh`, default a data-parallel mesh over
    every device, meta: the checkpoint's metadata)."""
    from clara_jax.train import checkpoint as ckpt
    from clara_jax.train.state import abstract_state, state_shardings

    path = Path(checkpoint)
    if not path.is_dir():
        raise LoadError(f"--checkpoint={checkpoint}: no such directory")
    manager = ckpt.make_manager(None, read_only=True, async_save=False,
                                directory=ckpt.source_dir(path))
    try:
        step = manager.latest_step()
        if step is None:
            raise LoadError(f"--checkpoint={checkpoint}: no checkpoint in "
                            f"{ckpt.source_dir(path)}")
        meta = ckpt.read_meta(manager, step)
    finally:
        manager.close()
    config = _config_from_meta(meta, f"{ckpt.source_dir(path)}/{step}")
    cfg = ModelConfig.from_config(config)
    mesh = make_mesh() if mesh is None else mesh

    def target(stage):
        abstract = abstract_state(config, cfg, stage)
        return abstract, state_shardings(cfg, mesh, abstract)

    params, meta = ckpt.restore_params(str(path), target)
    return config, cfg, params, dict(meta, step=step)


def load_inference_tokenizer(config, tokenizer_dir=None) -> Tokenizer:
    """`tokenizer_dir` (a saved clara tokenizer, or a Hugging Face tokenizer.json or its
    directory) when given, else the tokenizer of the run's data dir (DATA_DIR/tokenizer);
    checked against the config's vocabulary and number of memory tokens."""
    if tokenizer_dir is None:
        data_dir = config.train.get("data_dir")
        if not data_dir:
            raise LoadError("the checkpoint's config has no train.data_dir to find the "
                            "tokenizer in; pass --tokenizer=DIR")
        tokenizer_dir = Path(data_dir) / "tokenizer"
    try:
        tok = load_or_import_tokenizer(tokenizer_dir, int(config.model.num_memory_tokens))
        check_tokenizer_fits(tok, config)
    except (TokenizerError, OSError) as e:
        raise LoadError(f"tokenizer: {e} (pass --tokenizer=DIR to choose another)") from None
    return tok
