"""The model an index is built (or searched) with: config, params and tokenizer of a training
checkpoint (`clara_jax.train.checkpoint`: WORKDIR or WORKDIR/checkpoints, latest step).

The checkpoint's meta carries the run's config (so M, L, doc_max_len and chunk_overlap come
from the model that produced the latents); the tokenizer is the run's data tokenizer
(`config.train.data_dir/tokenizer`) unless a directory is given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import jax
import ml_collections

from clara_jax.config import saved_config
from clara_jax.model import ModelConfig


@dataclass
class LoadedModel:
    config: ml_collections.ConfigDict
    cfg: ModelConfig
    params: dict
    tokenizer: object
    source: str
    step: int


def load_checkpoint_model(path, tokenizer_dir=None, mesh=None) -> LoadedModel:
    """(config, cfg, params on `mesh` or this host's devices, tokenizer) of the latest step of
    the checkpoints under `path`. Raises CheckpointError / TokenizerError naming the path."""
    from clara_jax.data.pipeline import load_data_tokenizer
    from clara_jax.data.tokenizer import load_tokenizer
    from clara_jax.model.sharding import make_mesh
    from clara_jax.train import checkpoint as ckpt
    from clara_jax.train.state import abstract_state, state_shardings

    path = Path(path)
    if not path.is_dir():
        raise ckpt.CheckpointError(f"--checkpoint={path}: no such directory")
    step = ckpt.intact_step(ckpt.source_dir(path))  # says so when it skips a corrupt one
    if step is None:
        raise ckpt.CheckpointError(f"--checkpoint={path}: no checkpoint in "
                                   f"{ckpt.source_dir(path)}")
    manager = ckpt.make_manager(None, read_only=True, async_save=False,
                                directory=ckpt.source_dir(path))
    try:
        meta = ckpt.read_meta(manager, step)
    finally:
        manager.close()
    if "config" not in meta:
        raise ckpt.CheckpointError(f"{ckpt.source_dir(path)}/{step}/meta: field 'config' is "
                                   "missing")
    raw = meta["config"]
    config = saved_config(json.loads(raw) if isinstance(raw, str) else raw)
    cfg = ModelConfig.from_config(config)
    # This host's devices: an index shard is built per host (see LatentEncoder).
    mesh = mesh if mesh is not None else make_mesh(devices=jax.local_devices())

    def target(src_meta):  # restore_params passes the checkpoint's metadata
        a = abstract_state(config, cfg, int(src_meta["stage"]))
        return a, state_shardings(cfg, mesh, a)

    params, _ = ckpt.restore_params(str(path), target, step)
    pinned = ckpt.source_dir(path).parent / ckpt.TOKENIZER_DIR
    if tokenizer_dir:
        tok = load_tokenizer(tokenizer_dir)
    elif (pinned / "clara_tokenizer.json").is_file():
        # The run's own copy (`clara train` keeps one in WORKDIR), so the checkpoint works
        # from any directory and after its data dir moved.
        tok = load_tokenizer(pinned)
    else:
        data_dir = config.train.get("data_dir") if "train" in config else None
        if not data_dir:
            raise ckpt.CheckpointError(
                f"{path}: the run's config has no train.data_dir; pass --tokenizer=DIR")
        tok = load_data_tokenizer(data_dir)
    return LoadedModel(config, cfg, params, tok, str(path), int(step))
