"""Loading a model to serve, once for every command that serves one (`clara ask`, `clara
inspect`, `clara eval`, `clara index build`, `clara export`): the three layouts a model comes
in, the mesh it is served on, and the RAG pipeline over it.

Layouts (docs/design.md, "On-disk layouts"):
- a training run (`clara_jax.train.checkpoint`: WORKDIR or WORKDIR/checkpoints, latest intact
  step). Its meta carries the run's config (so M, L, doc_max_len and chunk_overlap come from
  the model that produced the latents); the tokenizer is the run's pinned copy
  (WORKDIR/tokenizer), else `config.train.data_dir/tokenizer`, unless a directory is given.
- a converted directory (`clara convert from-clara` / `from-hf`, clara_jax/convert/bundle.py):
  model_config.json and params/ (a training run has neither), its own tokenizer, the
  experiment config derived from its model config (`convert.bundle.experiment_config`); a
  released model served with no training step in between, so its step is 0.
- a serving bundle (`clara export`, written by clara_jax.export.bundle; its layout is named
  here because reading it is serving): bundle.json lists every file outside index/ with its
  size and sha256, checked on load, and the model identity the restored params must have.

Mesh. The params are placed by the logical-axis rules (clara_jax/model/sharding.py) on
`config.mesh` over this host's devices, so `mesh.fsdp` / `mesh.tensor` split the weights as in
training, and the pipeline splits every batch over (data, fsdp). Local devices, not all: each
JAX process of `clara eval` answers its own rows and each host builds its own index shard,
so the model runs with no collectives across hosts; only the search of a sharded index
exchanges queries and results between the processes, each of which holds its own shards
(`clara_jax.index.multihost`). A loader's `mesh` argument replaces that: a `Mesh`, or a
dict {axis: size} overriding config.mesh's axes (`--mesh=fsdp=2` on the command line).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import ml_collections

from clara_jax.config import ConfigError, saved_config
from clara_jax.convert import bundle as converted
from clara_jax.convert.bundle import load_params, read_model_config
from clara_jax.data.tokenizer import META_FILE, load_tokenizer
from clara_jax.fileio import as_path, check_format, manifest_problem, read_json
from clara_jax.index import model_identity, open_index
from clara_jax.infer.rag import RagPipeline, RagSettings
from clara_jax.model import ModelConfig, param_shardings
from clara_jax.model.sharding import MESH_AXES, make_mesh
from clara_jax.train import checkpoint as ckpt
from clara_jax.train.checkpoint import CheckpointError
from clara_jax.train.state import abstract_state, state_shardings

# The serving bundle's layout (see clara_jax/export/bundle.py for what each holds).
BUNDLE_FORMAT = "clara_jax.serving_bundle"
BUNDLE_FORMAT_VERSION = 1
BUNDLE_META_FILE = "bundle.json"
BUNDLE_EXPERIMENT_CONFIG_FILE = "experiment_config.json"
BUNDLE_PARAMS_DIR = "params"
BUNDLE_DECODER_DIR = "decoder"
BUNDLE_CLARA_PARAMS_FILE = "clara_params.safetensors"
BUNDLE_TOKENIZER_DIR = "tokenizer"
BUNDLE_INDEX_DIR = "index"


class BundleError(ValueError):
    """A bundle is missing, incomplete or does not match; the message names the file."""


@dataclasses.dataclass
class LoadedModel:
    """A model ready to serve. config: the finalized experiment config; cfg: its ModelConfig;
    params: the params tree, placed on `mesh` by the logical-axis rules; tokenizer; source:
    the path it was loaded from; step: the training step (0 for a converted model)."""

    config: ml_collections.ConfigDict
    cfg: ModelConfig
    params: dict
    tokenizer: object
    source: str
    step: int
    mesh: object = None


@dataclasses.dataclass
class Bundle:
    """A loaded serving bundle: model (a LoadedModel), index_path (None when exported without
    an index), meta (its bundle.json)."""

    path: Path
    model: LoadedModel
    index_path: Path | None
    meta: dict


def serving_mesh(config: ml_collections.ConfigDict, mesh=None, devices=None):
    """The mesh to serve `config`'s model on (module doc): `mesh` itself when it is a Mesh;
    otherwise config.mesh with the axes of the dict `mesh` (if any) replaced, over `devices`
    (default this host's). ConfigError naming config.mesh when that does not fit them. Unlike
    training (`train.loop.make_mesh_from_config`) there is no training batch to check: the
    pipeline rounds its batches up to the mesh's (data, fsdp) size."""
    if mesh is not None and not isinstance(mesh, dict):
        return mesh
    axes = {a: int(config.mesh[a]) for a in MESH_AXES}
    axes.update(mesh or {})
    devices = list(jax.local_devices() if devices is None else devices)
    try:
        return make_mesh(**axes, devices=devices)
    except ValueError as e:  # e.g. a pod run's mesh.fsdp=16 read on a host with 8 devices
        raise ConfigError(f"config.mesh: {e} on this host (serve on another mesh with "
                          "--mesh=data=..,fsdp=..,tensor=..)") from None


def load_checkpoint_model(path, tokenizer_dir=None, mesh=None) -> LoadedModel:
    """(config, cfg, params on the serving mesh, tokenizer) of the latest step of the
    checkpoints under `path`, or of the converted directory `path` (module doc). mesh: see
    `serving_mesh`. Raises CheckpointError / TokenizerError / ConversionError naming the
    path, ConfigError when the mesh does not fit."""
    path = as_path(path)  # a run on a bucket (gs://) is read where it is
    if not path.is_dir():
        raise ckpt.CheckpointError(f"--checkpoint={path}: no such directory")
    if converted.is_converted(path):
        return _load_converted(path, tokenizer_dir, mesh)
    step = ckpt.intact_step(ckpt.source_dir(path))  # says so when it skips a corrupt one
    if step is None:
        raise ckpt.CheckpointError(
            f"--checkpoint={path}: neither a training run (no checkpoint in "
            f"{ckpt.source_dir(path)}) nor a converted model (no "
            f"{converted.MODEL_CONFIG_FILE} and {converted.PARAMS_DIR}/, as `clara convert "
            "from-clara` writes)")
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
    mesh = serving_mesh(config, mesh)

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
        # Lazy: clara_jax.data.pipeline loads tensorflow_datasets (about a second), which
        # serving needs only here, for a run that kept no tokenizer copy of its own.
        from clara_jax.data.pipeline import load_data_tokenizer

        tok = load_data_tokenizer(data_dir)
    return LoadedModel(config, cfg, params, tok, str(path), int(step), mesh)


def _load_converted(path: Path, tokenizer_dir, mesh) -> LoadedModel:
    """A converted directory (clara_jax/convert/bundle.py) as a LoadedModel at step 0: its
    model config, params restored onto the serving mesh by the logical sharding rules, its own
    tokenizer (or `tokenizer_dir`) and the experiment config derived from it."""
    # A bundle holds the converted layout too; through --checkpoint its files would go
    # unchecked against bundle.json.
    if (path / BUNDLE_META_FILE).is_file():
        raise CheckpointError(f"--checkpoint={path}: a serving bundle (`clara export`); pass "
                              f"--bundle={path}")
    if not tokenizer_dir and not (path / META_FILE).is_file():
        raise CheckpointError(f"--checkpoint={path}: a converted model without a tokenizer "
                              f"(no {META_FILE}: converted with --notokenizer?); pass "
                              "--tokenizer=DIR")
    cfg = converted.read_model_config(path)
    config = converted.experiment_config(path, cfg)
    mesh = serving_mesh(config, mesh)
    cfg, params = converted.load_params(path, cfg, param_shardings(cfg, mesh))
    tok = load_tokenizer(tokenizer_dir or path)
    return LoadedModel(config, cfg, params, tok, str(path), 0, mesh)


def read_bundle_meta(path, verify: bool = True) -> dict:
    """bundle.json of the bundle at `path`, checked for format and (with `verify`) every file
    listed against its size and sha256."""
    path = Path(path)
    meta_path = path / BUNDLE_META_FILE
    meta = read_json(meta_path, BundleError,
                     "no such file (not a bundle written by `clara export`)", "bundle metadata")
    check_format(meta, meta_path, BUNDLE_FORMAT, BUNDLE_FORMAT_VERSION, BundleError)
    # Bundles written before params/ was listed name the size "size" and leave params/ out;
    # they are checked as far as they list.
    files = {name: {"bytes": rec.get("bytes", rec.get("size")), "sha256": rec["sha256"]}
             for name, rec in (meta.get("files") or {}).items()}
    if verify:
        excluded = (BUNDLE_INDEX_DIR, BUNDLE_META_FILE) + (() if any(
            n.startswith(BUNDLE_PARAMS_DIR + "/") for n in files) else (BUNDLE_PARAMS_DIR,))
        problem = manifest_problem(path, files, *excluded)
        if problem:
            raise BundleError(f"{problem} (checked against {meta_path}; export the bundle "
                              "again)")
    return meta


def load_bundle(path, mesh=None, tokenizer_dir=None, check_identity: bool = True) -> Bundle:
    """Loads a bundle: experiment config, model config, params (onto the serving mesh by the
    logical sharding rules; mesh: see `serving_mesh`) and tokenizer. With `check_identity` the
    restored params must have the identity recorded at export (catches a replaced params/).
    Raises BundleError naming the file, ConfigError when the mesh does not fit."""
    path = Path(path)
    meta = read_bundle_meta(path)
    cfg_path = path / BUNDLE_EXPERIMENT_CONFIG_FILE
    try:
        config = saved_config(json.loads(cfg_path.read_text()))
    except (OSError, json.JSONDecodeError) as e:
        raise BundleError(f"{cfg_path}: unreadable experiment config: {e}") from None
    cfg = read_model_config(path)
    if cfg != ModelConfig.from_config(config):
        raise BundleError(f"{path}: model_config.json and {BUNDLE_EXPERIMENT_CONFIG_FILE} "
                          "describe different models")
    mesh = serving_mesh(config, mesh)
    if not (path / BUNDLE_PARAMS_DIR).is_dir():
        raise BundleError(f"{path / BUNDLE_PARAMS_DIR}: missing")
    cfg, params = load_params(path, cfg, param_shardings(cfg, mesh))
    if check_identity:
        got = model_identity(cfg, params)
        bad = [k for k in ("config_hash", "params_checksum") if got.get(k) !=
               meta["identity"].get(k)]
        if bad:
            raise BundleError(f"{path / BUNDLE_PARAMS_DIR}: restored params differ from the "
                              f"export's identity ({', '.join(bad)}) in "
                              f"{path / BUNDLE_META_FILE}")
    tok = load_tokenizer(tokenizer_dir or path / BUNDLE_TOKENIZER_DIR)
    index_path = path / BUNDLE_INDEX_DIR if (path / BUNDLE_INDEX_DIR).is_dir() else None
    model = LoadedModel(config, cfg, params, tok, str(path), int(meta["source"]["step"]),
                        mesh)
    return Bundle(path, model, index_path, meta)


def load_pipeline(checkpoint=None, index=None, bundle=None, tokenizer=None, mesh=None,
                  **settings):
    """A `RagPipeline` on the serving mesh from a training checkpoint or converted model (+
    index) or a serving bundle (its own index unless `index` is given); the index is opened
    with the model's identity, so one built by another compressor is refused. mesh: see
    `serving_mesh`. settings: RagSettings fields; num_docs and max_new_tokens default to the
    config's data.num_docs and data.answer_max_len."""
    if (checkpoint is None) == (bundle is None):
        raise ValueError("give exactly one of checkpoint and bundle")
    if bundle is not None:
        b = load_bundle(bundle, mesh=mesh, tokenizer_dir=tokenizer)
        loaded, index = b.model, index if index is not None else b.index_path
    else:
        loaded = load_checkpoint_model(checkpoint, tokenizer, mesh=mesh)
    config = loaded.config
    opened = None
    if index is not None:
        opened = open_index(index, identity=model_identity(loaded.cfg, loaded.params))
    settings.setdefault("num_docs", int(config.data.num_docs))
    settings.setdefault("max_new_tokens", int(config.data.answer_max_len))
    return RagPipeline(config, loaded.cfg, loaded.params, loaded.tokenizer, opened,
                       RagSettings(**settings), mesh=loaded.mesh)
