"""The serving bundle: everything `clara ask` needs, in one directory that can be moved.

    BUNDLE/
      bundle.json              format, creation time, the model's identity (config hash and
                               compressor-parameter sha256, as in the index), the source
                               checkpoint and step, library versions, and size + sha256 of
                               every file outside index/ (which has its own manifest, and
                               `clara index add/delete` may change); written last, and every
                               file is checked against it when the bundle is loaded
      model_config.json        every ModelConfig field (the `clara convert` layout, so
                               `clara_jax.convert.bundle.load_params(BUNDLE)` and
                               `clara convert to-hf BUNDLE OUT` read it too)
      experiment_config.json   the run's full experiment config (data lengths, prompts)
      params/                  the full params tree, orbax (StandardCheckpointer): what
                               `load_bundle` restores
      decoder/                 the base decoder as a Hugging Face checkpoint (config.json +
                               model.safetensors, `clara_jax.convert.hf.save`)
      clara_params.safetensors the rest: LoRA adapters, memory embeddings, latent
                               projections, named by their params path joined with '/'
      tokenizer/               the run's tokenizer (`Tokenizer.save`)
      index/                   the latent index, copied (its files use relative paths)

The bundle is written into a temporary directory beside BUNDLE and renamed into place when
complete, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np

from clara_jax.config import saved_config
from clara_jax.fileio import file_manifest, manifest_problem, read_json, replace_dir

FORMAT = "clara_jax.serving_bundle"
FORMAT_VERSION = 1
META_FILE = "bundle.json"
EXPERIMENT_CONFIG_FILE = "experiment_config.json"
PARAMS_DIR = "params"
DECODER_DIR = "decoder"
CLARA_PARAMS_FILE = "clara_params.safetensors"
TOKENIZER_DIR = "tokenizer"
INDEX_DIR = "index"


class BundleError(ValueError):
    """A bundle is missing, incomplete or does not match; the message names the file."""


@dataclasses.dataclass
class Bundle:
    """A loaded bundle: model (an `index.model_source.LoadedModel`: config, cfg, params,
    tokenizer, source, step), index_path (None when exported without an index), meta."""

    path: Path
    model: object
    index_path: Path | None
    meta: dict


def _versions() -> dict:
    import flax
    import jaxlib
    import orbax.checkpoint as ocp

    import clara_jax

    return {"clara_jax": clara_jax.__version__, "jax": jax.__version__,
            "jaxlib": jaxlib.__version__, "flax": flax.__version__,
            "orbax_checkpoint": getattr(ocp, "__version__", "unknown"),
            "numpy": np.__version__, "python": platform.python_version()}


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def non_base_arrays(params) -> dict[str, np.ndarray]:
    """Adapters, memory embeddings and latent projections (everything `param_group` does not
    call 'base') as host arrays by '/'-joined params path. Float arrays of other widths are
    stored as float32 (safetensors' numpy writer has no bfloat16)."""
    from clara_jax.model import param_group

    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if param_group(path) == "base":
            continue
        x = np.asarray(jax.device_get(leaf))
        if x.dtype != np.float32 and (x.dtype.kind == "f" or x.dtype.name == "bfloat16"):
            x = x.astype(np.float32)
        out[_path_name(path)] = np.ascontiguousarray(x)
    return out


def _save_orbax(directory: Path, params) -> None:
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory.absolute(), params)
        ckptr.wait_until_finished()


def export_bundle(checkpoint, out, index=None, tokenizer=None, overwrite: bool = False,
                  decoder_dtype: str = "float32", progress: bool = True) -> dict:
    """Writes the serving bundle of the latest checkpoint under `checkpoint` (a training
    workdir or its checkpoints dir) to `out`, with a copy of the latent `index` (which must
    have been built by this checkpoint's compressor; None: a bundle for closed-book answers
    only). tokenizer: its directory (default: the run's data tokenizer). Returns bundle.json.
    """
    from safetensors.numpy import save_file

    from clara_jax.convert import hf
    from clara_jax.convert.bundle import MODEL_CONFIG_FILE, model_config_to_dict
    from clara_jax.index import model_identity, open_index
    from clara_jax.index.model_source import load_checkpoint_model

    if jax.process_count() > 1:
        raise BundleError("clara export runs as one process (it gathers the params on this "
                          "host); start it without the multi-process settings")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise BundleError(f"{out}: exists and is not empty (pass --overwrite)")
    loaded = load_checkpoint_model(checkpoint, tokenizer)
    cfg, params = loaded.cfg, loaded.params
    identity = model_identity(cfg, params)
    index_meta = None
    if index is not None:
        # Refuses an index built by another compressor before anything is written.
        opened = open_index(index, identity=identity)
        index_meta = {"source": str(Path(index).absolute()), "num_docs": opened.num_docs,
                      "m": opened.m, "latent_width": opened.latent_width}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        _save_orbax(tmp / PARAMS_DIR, params)
        (tmp / MODEL_CONFIG_FILE).write_text(
            json.dumps(model_config_to_dict(cfg), indent=2) + "\n")
        (tmp / EXPERIMENT_CONFIG_FILE).write_text(loaded.config.to_json(indent=2) + "\n")
        loaded.tokenizer.save(tmp / TOKENIZER_DIR)
        extra = {}
        hf_tok = tmp / TOKENIZER_DIR / "tokenizer.json"
        if hf_tok.exists():  # a Hugging Face tokenizer travels with the HF decoder too
            extra["tokenizer.json"] = hf_tok
        hf.save(cfg, params, tmp / DECODER_DIR, dtype=decoder_dtype, progress=progress,
                extra_files=extra)
        save_file(non_base_arrays(params), str(tmp / CLARA_PARAMS_FILE),
                  metadata={"format": "clara_jax.params", "scan_layers": str(cfg.scan_layers)})
        os.chmod(tmp / CLARA_PARAMS_FILE, 0o644)  # written through a private temp file
        if index is not None:
            shutil.copytree(index, tmp / INDEX_DIR)
            open_index(tmp / INDEX_DIR, identity=identity)  # the copy opens and matches
        files = file_manifest(tmp, INDEX_DIR, META_FILE)
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "identity": identity,
                "source": {"checkpoint": str(Path(checkpoint).absolute()),
                           "step": loaded.step},
                "index": index_meta, "tokenizer": {"kind": loaded.tokenizer.kind,
                                                   "vocab_size": loaded.tokenizer.vocab_size},
                "decoder_dtype": decoder_dtype, "versions": _versions(),
                "host": platform.node(), "files": files}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def read_meta(path, verify: bool = True) -> dict:
    """bundle.json of the bundle at `path`, checked for format and (with `verify`) every file
    listed against its size and sha256."""
    path = Path(path)
    meta_path = path / META_FILE
    meta = read_json(meta_path, BundleError,
                     "no such file (not a bundle written by `clara export`)", "bundle metadata")
    if meta.get("format") != FORMAT:
        raise BundleError(f"{meta_path}: field 'format' is {meta.get('format')!r}, expected "
                          f"{FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{meta_path}: field 'format_version' is "
                          f"{meta.get('format_version')!r}, this code reads {FORMAT_VERSION}")
    # Bundles written before params/ was listed name the size "size" and leave params/ out;
    # they are checked as far as they list.
    files = {name: {"bytes": rec.get("bytes", rec.get("size")), "sha256": rec["sha256"]}
             for name, rec in (meta.get("files") or {}).items()}
    if verify:
        excluded = (INDEX_DIR, META_FILE) + (() if any(
            n.startswith(PARAMS_DIR + "/") for n in files) else (PARAMS_DIR,))
        problem = manifest_problem(path, files, *excluded)
        if problem:
            raise BundleError(f"{problem} (checked against {meta_path}; export the bundle "
                              "again)")
    return meta


def load_bundle(path, mesh=None, tokenizer_dir=None, check_identity: bool = True) -> Bundle:
    """Loads a bundle: experiment config, model config, params (onto `mesh`, default this
    host's devices, by the logical sharding rules) and tokenizer. With `check_identity` the
    restored params must have the identity recorded at export (catches a replaced params/).
    Raises BundleError naming the file."""
    from clara_jax.convert.bundle import load_params, read_model_config
    from clara_jax.data.tokenizer import load_tokenizer
    from clara_jax.index import model_identity
    from clara_jax.index.model_source import LoadedModel
    from clara_jax.model import ModelConfig, param_shardings
    from clara_jax.model.sharding import make_mesh

    path = Path(path)
    meta = read_meta(path)
    cfg_path = path / EXPERIMENT_CONFIG_FILE
    try:
        config = saved_config(json.loads(cfg_path.read_text()))
    except (OSError, json.JSONDecodeError) as e:
        raise BundleError(f"{cfg_path}: unreadable experiment config: {e}") from None
    cfg = read_model_config(path)
    if cfg != ModelConfig.from_config(config):
        raise BundleError(f"{path}: model_config.json and {EXPERIMENT_CONFIG_FILE} describe "
                          "different models")
    mesh = mesh if mesh is not None else make_mesh(devices=jax.local_devices())
    shardings = param_shardings(cfg, mesh)
    if not (path / PARAMS_DIR).is_dir():
        raise BundleError(f"{path / PARAMS_DIR}: missing")
    cfg, params = load_params(path, cfg, shardings)
    if check_identity:
        got = model_identity(cfg, params)
        bad = [k for k in ("config_hash", "params_checksum") if got.get(k) !=
               meta["identity"].get(k)]
        if bad:
            raise BundleError(f"{path / PARAMS_DIR}: restored params differ from the export's "
                              f"identity ({', '.join(bad)}) in {path / META_FILE}")
    tok = load_tokenizer(tokenizer_dir or path / TOKENIZER_DIR)
    index_path = path / INDEX_DIR if (path / INDEX_DIR).is_dir() else None
    model = LoadedModel(config, cfg, params, tok, str(path), int(meta["source"]["step"]))
    return Bundle(path, model, index_path, meta)
