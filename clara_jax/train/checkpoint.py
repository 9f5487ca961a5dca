"""Orbax checkpoints of a training run: the train state (restored straight onto the target
mesh's shardings, whatever mesh wrote it), the data iterator's state and run metadata.

Layout: WORKDIR/checkpoints/<step>/{state, data, meta, clara_manifest.json}. Saves are
asynchronous (the arrays are copied to host before `save` returns, so the next step may donate
them); orbax writes each step to a temporary directory and renames it when complete, so an
interrupted save never looks like a checkpoint.

Integrity: once orbax has finished a step, `seal` writes its manifest (size and sha256 of every
file of the step), last. Every restore verifies the step it reads against its manifest first
(`intact_step`); a step whose bytes changed, whose files are missing, or that has no manifest
while other steps have one (it was cut off before sealing) is reported in one line and the
previous intact step is used instead. Steps written before manifests existed (no step has
one) are read unverified.

Workdirs on object storage (`gs://bucket/run`): orbax writes the arrays through tensorstore's
GCS driver and, having no rename there, writes each step in place and marks it finished with
a commit file; the manifests, the tokenizer copy and the moves of corrupt steps go through
`clara_jax.fileio`'s URL paths. Orbax's arrays reach only local paths and gs://.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import weakref
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from clara_jax.data.tokenizer import META_FILE, saved_digest
from clara_jax.fileio import (
    absolute,
    as_path,
    atomic_write_bytes,
    atomic_write_json,
    file_manifest,
    files_under,
    is_url,
    manifest_problem,
    replace_dir,
)
from clara_jax.train.state import TrainState

CHECKPOINT_DIR = "checkpoints"
# WORKDIR/tokenizer: the run's copy of its data's tokenizer (`pin_tokenizer`).
TOKENIZER_DIR = "tokenizer"
MANIFEST_FILE = "clara_manifest.json"
# Where a training run moves the corrupt steps it skips, so that orbax neither resumes
# from nor overwrites them and they stay for inspection.
CORRUPT_DIR = "corrupt_checkpoints"
# The steps each manager saved that have no manifest yet (orbax may still be writing them).
_unsealed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, empty or does not match the run."""


def checkpoint_dir(workdir) -> Path:
    """Where a run in WORKDIR keeps its checkpoints: WORKDIR/checkpoints (an epath.Path for a
    URL workdir)."""
    return absolute(as_path(workdir) / CHECKPOINT_DIR)


def source_dir(source) -> Path:
    """The checkpoints directory of `source`: a run's workdir or its checkpoints dir."""
    source = as_path(source)
    return checkpoint_dir(source) if (source / CHECKPOINT_DIR).is_dir() else absolute(source)


def check_storage(workdir) -> None:
    """CheckpointError for a URL workdir that orbax cannot write arrays to (tensorstore is
    given local paths and gs:// only)."""
    if is_url(workdir) and not os.fspath(workdir).startswith("gs://"):
        raise CheckpointError(f"--workdir={os.fspath(workdir)}: orbax checkpoints go to a local "
                              "path or gs://bucket/... only")


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
    """Saves `state` at its step with the data iterator's state and `meta` (JSON-able); the
    previous save's manifest is written first (orbax waits for that save anyway)."""
    step = int(jax.device_get(state.step))
    finish(manager)
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state or {}),
        meta=ocp.args.JsonSave(meta)), force=True)
    _unsealed.setdefault(manager, set()).add(step)
    if not manager._options.enable_async_checkpointing:
        finish(manager)
    return step


def finish(manager: ocp.CheckpointManager) -> None:
    """Waits for the manager's saves and writes their manifests."""
    manager.wait_until_finished()
    seal(manager)


def seal(manager: ocp.CheckpointManager) -> None:
    """Writes the manifest of each step this manager saved once orbax has finished it
    (process 0 only; every process's files are in the shared step directory by then)."""
    pending = _unsealed.get(manager)
    if not pending or manager.is_saving_in_progress():
        return
    if jax.process_index() == 0:
        for step in sorted(pending):
            step_dir = as_path(os.fspath(manager.directory)) / str(step)
            if step_dir.is_dir():  # not already removed by max_to_keep
                atomic_write_json(step_dir / MANIFEST_FILE,
                                  {"step": step, "files": file_manifest(step_dir,
                                                                        MANIFEST_FILE)})
    pending.clear()


def step_problem(step_dir: Path, manifests_expected: bool) -> str | None:
    """What is wrong with a finished orbax step directory, or None when it is intact (or,
    without `manifests_expected`, has no manifest to check)."""
    path = step_dir / MANIFEST_FILE
    if not path.is_file():
        return ("no manifest (the run was stopped before the save was sealed)"
                if manifests_expected else None)
    try:
        manifest = json.loads(path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST_FILE} is unreadable"
    return manifest_problem(step_dir, manifest, MANIFEST_FILE)


def intact_step(directory, move_bad_to=None) -> int | None:
    """The newest step under the checkpoints `directory` that passes its manifest, or None
    when there is no step. Each newer step that fails is reported in one line on stderr
    (and moved into `move_bad_to` when given, so that a resumed run neither restores nor
    overwrites it). Raises CheckpointError when no step is intact."""
    directory = as_path(directory)
    steps = sorted((int(p.name) for p in directory.iterdir() if p.name.isdigit()
                    and p.is_dir()), reverse=True) if directory.is_dir() else []
    expected = any((directory / str(s) / MANIFEST_FILE).is_file() for s in steps)
    bad = []
    for step in steps:
        problem = step_problem(directory / str(step), expected)
        if problem is None:
            if bad:
                print(f"warning: using checkpoint step {step} of {directory}: newer "
                      + "; ".join(bad), file=sys.stderr, flush=True)
            return step
        where = ""
        if move_bad_to is not None and jax.process_index() == 0:
            target = as_path(move_bad_to) / str(step)
            n = 1
            while target.exists():
                target, n = as_path(move_bad_to) / f"{step}.{n}", n + 1
            target.parent.mkdir(parents=True, exist_ok=True)
            _move_tree(directory / str(step), target)
            where = f", moved to {target}"
        bad.append(f"step {step} is corrupt or partial ({problem}{where})")
    if bad:
        raise CheckpointError(f"{directory}: no intact checkpoint: " + "; ".join(bad)
                              + " (start over in a new --workdir)")
    return None


def _move_tree(src, dst) -> None:
    if not is_url(src):
        shutil.move(str(src), str(dst))
        return
    # Object storage has no directory rename: copy every object (inside the store, not
    # through this host: a step's files can be gigabytes), then delete the source.
    for rel in files_under(src):
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).copy(dst / rel, overwrite=True)
    src.rmtree()


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
    try:
        out = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_target(abstract, shardings)),
            data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    except (OSError, ValueError) as e:  # an unverified (pre-manifest) step that is damaged
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise CheckpointError(f"{manager.directory}/{step}: cannot be restored "
                              f"({type(e).__name__}: {first})") from e
    return out["state"], dict(out["data"] or {}), dict(out["meta"] or {})


def restore_params(source, target_for_stage, step: int | None = None) -> tuple[dict, dict]:
    """Params of the latest checkpoint under `source` (a workdir or its checkpoints dir), for
    starting the next stage (`--init_from`). `target_for_stage(meta)` gives (abstract train
    state, shardings) for the run that wrote the checkpoint, from its metadata (its optimizer
    state's structure depends on the stage). Returns (params on the target shardings, the
    source's meta). `step`: default the newest intact step."""
    if not as_path(source).is_dir():
        raise CheckpointError(f"--init_from={source}: no such directory")
    step = intact_step(source_dir(source)) if step is None else step
    if step is None:
        raise CheckpointError(f"--init_from={source}: no checkpoint in {source_dir(source)}")
    manager = make_manager(None, read_only=True, async_save=False,
                           directory=source_dir(source))
    try:
        meta = read_meta(manager, step)
        abstract, shardings = target_for_stage(meta)
        state, _, meta = restore(manager, abstract, shardings, step)
    finally:
        manager.close()
    return state.params, meta


def pin_tokenizer(workdir, tokenizer_dir) -> None:
    """Keeps a copy of the data's tokenizer in WORKDIR/tokenizer, so the run's checkpoints
    are read with it from any directory; CheckpointError when WORKDIR already holds another
    tokenizer (its checkpoints were trained on other token ids)."""
    pinned = as_path(workdir) / TOKENIZER_DIR
    if is_url(pinned):
        _pin_by_upload(workdir, pinned, tokenizer_dir, saved_digest)
        return
    if pinned.is_dir():
        _check_same_tokenizer(workdir, pinned, tokenizer_dir, saved_digest)
        return
    tmp = Path(tempfile.mkdtemp(dir=workdir, prefix=f".{TOKENIZER_DIR}.tmp-"))
    shutil.copytree(tokenizer_dir, tmp, dirs_exist_ok=True)
    replace_dir(tmp, pinned)


def _check_same_tokenizer(workdir, pinned, tokenizer_dir, saved_digest) -> None:
    if saved_digest(pinned) != saved_digest(tokenizer_dir):
        raise CheckpointError(
            f"{workdir} was trained with the tokenizer in {pinned}, but {tokenizer_dir} is "
            "another one (data built with another tokenizer): use the data this run "
            "started with, or a new --workdir")


def _pin_by_upload(workdir, pinned, tokenizer_dir, saved_digest) -> None:
    """pin_tokenizer on object storage, which has no directory rename: the files are uploaded
    one by one with the tokenizer's metadata file last, so a copy cut off before it is seen
    as no copy (and made again) rather than as another tokenizer."""
    if (pinned / META_FILE).is_file():
        _check_same_tokenizer(workdir, pinned, tokenizer_dir, saved_digest)
        return
    if pinned.exists():
        pinned.rmtree()  # an unfinished copy
    files = sorted(files_under(tokenizer_dir), key=lambda rel: rel == META_FILE)
    for rel in files:
        atomic_write_bytes(pinned / rel, (Path(tokenizer_dir) / rel).read_bytes())
