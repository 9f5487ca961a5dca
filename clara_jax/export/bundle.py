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
                               `load_bundle` (clara_jax/infer/serving.py) restores
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

import datetime
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path

import flax
import jax
import jaxlib
import numpy as np
import orbax.checkpoint as ocp
from safetensors.numpy import save_file

import clara_jax
from clara_jax.convert import hf
from clara_jax.convert.bundle import MODEL_CONFIG_FILE, model_config_to_dict
from clara_jax.fileio import file_manifest, replace_dir
from clara_jax.index import model_identity, open_index

# The layout, its error and its reader live with the other loaders (clara_jax/infer/serving.py:
# reading a bundle is serving, and the index and infer packages must not import export); they
# keep their names here for the writer and for callers of `clara_jax.export`.
from clara_jax.infer.serving import BUNDLE_CLARA_PARAMS_FILE as CLARA_PARAMS_FILE
from clara_jax.infer.serving import BUNDLE_DECODER_DIR as DECODER_DIR
from clara_jax.infer.serving import BUNDLE_EXPERIMENT_CONFIG_FILE as EXPERIMENT_CONFIG_FILE
from clara_jax.infer.serving import BUNDLE_FORMAT as FORMAT
from clara_jax.infer.serving import BUNDLE_FORMAT_VERSION as FORMAT_VERSION
from clara_jax.infer.serving import BUNDLE_INDEX_DIR as INDEX_DIR
from clara_jax.infer.serving import BUNDLE_META_FILE as META_FILE
from clara_jax.infer.serving import BUNDLE_PARAMS_DIR as PARAMS_DIR
from clara_jax.infer.serving import BUNDLE_TOKENIZER_DIR as TOKENIZER_DIR
from clara_jax.infer.serving import Bundle, BundleError, load_bundle, load_checkpoint_model
from clara_jax.infer.serving import read_bundle_meta as read_meta
from clara_jax.model import param_group
from clara_jax.param_store import path_name, save_orbax

__all__ = ["CLARA_PARAMS_FILE", "DECODER_DIR", "EXPERIMENT_CONFIG_FILE", "FORMAT",
           "FORMAT_VERSION", "INDEX_DIR", "META_FILE", "PARAMS_DIR", "TOKENIZER_DIR", "Bundle",
           "BundleError", "export_bundle", "load_bundle", "non_base_arrays", "read_meta"]


def _versions() -> dict:
    return {"clara_jax": clara_jax.__version__, "jax": jax.__version__,
            "jaxlib": jaxlib.__version__, "flax": flax.__version__,
            "orbax_checkpoint": getattr(ocp, "__version__", "unknown"),
            "numpy": np.__version__, "python": platform.python_version()}


def non_base_arrays(params) -> dict[str, np.ndarray]:
    """Adapters, memory embeddings and latent projections (everything `param_group` does not
    call 'base') as host arrays by '/'-joined params path. Float arrays of other widths are
    stored as float32 (safetensors' numpy writer has no bfloat16)."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if param_group(path) == "base":
            continue
        x = np.asarray(jax.device_get(leaf))
        if x.dtype != np.float32 and (x.dtype.kind == "f" or x.dtype.name == "bfloat16"):
            x = x.astype(np.float32)
        out[path_name(path)] = np.ascontiguousarray(x)
    return out


def export_bundle(checkpoint, out, index=None, tokenizer=None, overwrite: bool = False,
                  decoder_dtype: str = "float32", progress: bool = True) -> dict:
    """Writes the serving bundle of the latest checkpoint under `checkpoint` (a training
    workdir or its checkpoints dir) to `out`, with a copy of the latent `index` (which must
    have been built by this checkpoint's compressor; None: a bundle for closed-book answers
    only). tokenizer: its directory (default: the run's data tokenizer). Returns bundle.json.
    """
    if jax.process_count() > 1:
        raise BundleError("clara export runs as one process (it gathers the params on this "
                          "host); start it without the multi-process settings")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise BundleError(f"{out}: exists and is not empty (pass --overwrite)")
    # One data axis over this host's devices, whatever config.mesh says: the params are only
    # gathered to this host and written, so a run trained on a larger mesh exports anywhere.
    loaded = load_checkpoint_model(checkpoint, tokenizer,
                                   mesh={"data": -1, "fsdp": 1, "tensor": 1})
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
        save_orbax(tmp / PARAMS_DIR, params)
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
