"""Orbax checkpoints of a training run: the train state (restored straight onto the target
mesh's shardings, whatever mesh wrote it), the data iterator's state and run metadata.

Layout: WORKDIR/checkpoints/<step>/{state, data, meta}. Saves are asynchronous (the arrays are
copied to host before `save` returns, so the next step may donate them); orbax writes each
step to a temporary directory and renames it when complete, so an interrupted save never
looks like a checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from clara_jax.train.state import TrainState

CHECKPOINT_DIR = "checkpoints"


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, empty or does not match the run."""


def checkpoint_dir(workdir) -> Path:
    """Where a run in WORKDIR keeps its checkpoints: WORKDIR/checkpoints."""
    return (Path(workdir) / CHECKPOINT_DIR).absolute()


def source_dir(source) -> Path:
    """The checkpoints directory of `source`: a run's workdir or its checkpoints dir."""
    source = Path(source)
    return checkpoint_dir(source) if (source / CHECKPOINT_DIR).is_dir() else source.absolute()


def make_manager(workdir, keep: int = 3, async_save: bool = True, read_only: bool = False,
                 directory=None) -> ocp.CheckpointManager:
    """A CheckpointManager over WORKDIR/checkpoints (or `directory`) keeping the last `keep`
    steps."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else keep, save_interval_steps=0 if read_only else 1,
        enable_async_checkpointing=async_save, create=not read_only, read_only=read_only)
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    if read_only:  # orbax warns "Given directory is read only" on every restore-only open
        absl_logger.setLevel(logging.ERROR)
    try:
        return ocp.CheckpointManager(directory or checkpoint_dir(workdir), options=options,
                                     item_names=("state", "data", "meta"))
    finally:
        absl_logger.setLevel(level)


def save(manager: ocp.CheckpointManager, state: TrainState, data_state: dict | None,
         meta: dict) -> int:
    """Saves `state` at its step with the data iterator's state and `meta` (JSON-able)."""
    step = int(jax.device_get(state.step))
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state or {}),
        meta=ocp.args.JsonSave(meta)), force=True)
    return step


# The model fields that decide the parameters' shapes and tree structure.
SHAPE_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                "mlp_dim", "num_memory_tokens", "latent_dim", "qkv_bias", "tie_embeddings",
                "scan_layers", "lora.rank", "lora.targets", "lora.adapters")


def _field(model: dict, name: str):
    for key in name.split("."):
        model = model.get(key) if isinstance(model, dict) else None
    return model


def check_model(meta: dict, config, where: str) -> None:
    """Raises CheckpointError naming the fields when the run that wrote `meta` had another
    model shape than `config` (orbax would only report a tree mismatch, field by field)."""
    if "config" not in meta:
        return
    saved = json.loads(meta["config"]).get("model", {})
    ours = json.loads(config.to_json()).get("model", {})
    diff = [n for n in SHAPE_FIELDS if _field(saved, n) != _field(ours, n)]
    if diff:
        raise CheckpointError(
            f"{where} holds a run of another model: "
            + ", ".join(f"model.{n}={_field(saved, n)}" for n in diff)
            + "; this config has " + ", ".join(f"model.{n}={_field(ours, n)}" for n in diff)
            + " (use a new --workdir, or the config that wrote it)")


def _target(abstract: TrainState, shardings) -> TrainState:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)


def read_meta(manager: ocp.CheckpointManager, step: int | None = None) -> dict:
    step = manager.latest_step() if step is None else step
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore(manager: ocp.CheckpointManager, abstract: TrainState, shardings,
            step: int | None = None) -> tuple[TrainState, dict, dict]:
    """(state on `shardings`, data iterator state, meta) of `step` (default: the latest)."""
    step = manager.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"no checkpoint in {manager.directory}")
    out = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_target(abstract, shardings)),
        data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    return out["state"], dict(out["data"] or {}), dict(out["meta"] or {})


def restore_params(source, target_for_stage) -> tuple[dict, dict]:
    """Params of the latest checkpoint under `source` (a workdir or its checkpoints dir), for
    starting the next stage (`--init_from`). `target_for_stage(meta)` gives (abstract train
    state, shardings) for the run that wrote the checkpoint, from its metadata (its optimizer
    state's structure depends on the stage). Returns (params on the target shardings, the
    source's meta)."""
    if not os.path.isdir(source):
        raise CheckpointError(f"--init_from={source}: no such directory")
    manager = make_manager(None, read_only=True, async_save=False,
                           directory=source_dir(source))
    try:
        step = manager.latest_step()
        if step is None:
            raise CheckpointError(f"--init_from={source}: no checkpoint in "
                                  f"{source_dir(source)}")
        meta = read_meta(manager, step)
        abstract, shardings = target_for_stage(meta)
        state, _, meta = restore(manager, abstract, shardings, step)
    finally:
        manager.close()
    return state.params, meta
