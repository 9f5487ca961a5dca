"""The model an index is built (or searched) with: config, params and tokenizer of a training
checkpoint (`clara_jax.train.checkpoint`: WORKDIR or WORKDIR/checkpoints, latest step) or of
a converted directory (`clara convert from-clara` / `from-hf`, clara_jax/convert/bundle.py),
which serves a released model with no training step in between.

The checkpoint's meta carries the run's config (so M, L, doc_max_len and chunk_overlap come
from the model that produced the latents); the tokenizer is the run's data tokenizer
(`config.train.data_dir/tokenizer`) unless a directory is given. A converted directory is told
apart by its model_config.json and params/ (a training run has neither); it carries its own
tokenizer, and its experiment config is derived from its model config
(`clara_jax.convert.bundle.experiment_config`); its step is 0.
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
    the checkpoints under `path`, or of the converted directory `path` (module doc). Raises
    CheckpointError / TokenizerError / ConversionError naming the path."""
    from clara_jax.convert import bundle
    from clara_jax.data.pipeline import load_data_tokenizer
    from clara_jax.data.tokenizer import load_tokenizer
    from clara_jax.model.sharding import make_mesh
    from clara_jax.train import checkpoint as ckpt
    from clara_jax.train.state import abstract_state, state_shardings

    path = Path(path)
    if not path.is_dir():
        raise ckpt.CheckpointError(f"--checkpoint={path}: no such directory")
    # This host's devices: an index shard is built per host (see LatentEncoder).
    mesh = mesh if mesh is not None else make_mesh(devices=jax.local_devices())
    if bundle.is_converted(path):
        return _load_converted(path, tokenizer_dir, mesh)
    step = ckpt.intact_step(ckpt.source_dir(path))  # says so when it skips a corrupt one
    if step is None:
        raise ckpt.CheckpointError(
            f"--checkpoint={path}: neither a training run (no checkpoint in "
            f"{ckpt.source_dir(path)}) nor a converted model (no {bundle.MODEL_CONFIG_FILE} "
            f"and {bundle.PARAMS_DIR}/, as `clara convert from-clara` writes)")
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


def _load_converted(path: Path, tokenizer_dir, mesh) -> LoadedModel:
    """A converted directory (clara_jax/convert/bundle.py) as a LoadedModel at step 0: its
    model config, params restored onto `mesh` by the logical sharding rules, its own tokenizer
    (or `tokenizer_dir`) and the experiment config derived from it."""
    from clara_jax.convert import bundle
    from clara_jax.data.tokenizer import META_FILE, load_tokenizer
    from clara_jax.export.bundle import META_FILE as BUNDLE_META_FILE
    from clara_jax.model import param_shardings
    from clara_jax.train.checkpoint import CheckpointError

    if (path / BUNDLE_META_FILE).is_file():
        raise CheckpointError(f"--checkpoint={path}: a serving bundle (`clara export`); pass "
                              f"--bundle={path}")
    if not tokenizer_dir and not (path / META_FILE).is_file():
        raise CheckpointError(f"--checkpoint={path}: a converted model without a tokenizer "
                              f"(no {META_FILE}: converted with --notokenizer?); pass "
                              "--tokenizer=DIR")
    cfg = bundle.read_model_config(path)
    config = bundle.experiment_config(path, cfg)
    cfg, params = bundle.load_params(path, cfg, param_shardings(cfg, mesh))
    tok = load_tokenizer(tokenizer_dir or path)
    return LoadedModel(config, cfg, params, tok, str(path), 0)
