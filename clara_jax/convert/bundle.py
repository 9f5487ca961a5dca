"""The converted-checkpoint directory that `clara convert from-hf` writes and `to-hf` reads.

    DST/
      model_config.json     every ModelConfig field (JSON object)
      params/               the full CLaRa params tree, orbax (StandardCheckpointer)
      tokenizer.json        the checkpoint's tokenizer with <pad>?, <ENC>, <SEP>, <MEM i> added
      clara_tokenizer.json  the special-token ids (clara_jax.data.tokenizer format)
      hf_config.json        the source config.json, the template for `to-hf`
      hf_files/             other files of the source kept for `to-hf` (generation_config.json,
                            tokenizer_config.json, special_tokens_map.json, tokenizer.model,
                            chat_template.jinja)

The training code will own a checkpoint module (orbax CheckpointManager); until then this is
the one place that reads and writes this layout.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import jax

from clara_jax.convert import hf
from clara_jax.fileio import read_json, replace_dir
from clara_jax.model import ModelConfig, abstract_params

MODEL_CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
HF_CONFIG_FILE = "hf_config.json"
HF_FILES_DIR = "hf_files"
TOKENIZER_FILE = "tokenizer.json"
# Files of a Hugging Face directory that are neither weights nor config.json but belong with
# the model; carried through from-hf and back out by to-hf.
HF_EXTRA_FILES = ("generation_config.json", "tokenizer_config.json",
                  "special_tokens_map.json", "tokenizer.model", "chat_template.jinja")


def model_config_to_dict(cfg: ModelConfig) -> dict:
    d = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def model_config_from_dict(d: dict, where: str = MODEL_CONFIG_FILE) -> ModelConfig:
    """The inverse of `model_config_to_dict`; errors name the file and the field."""
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise hf.ConversionError(f"{where}: unknown field(s) {unknown}")
    required = [n for n, f in fields.items()
                if f.default is dataclasses.MISSING and n not in d]
    if required:
        raise hf.ConversionError(f"{where}: missing field(s) {required}")
    out = {}
    for name, value in d.items():
        default = fields[name].default
        if isinstance(default, tuple) or name in ("lora_targets", "adapters"):
            if not isinstance(value, list):
                raise hf.ConversionError(f"{where}: field '{name}'={value!r}: expected a list")
            value = tuple(value)
        out[name] = value
    return ModelConfig(**out)


def read_model_config(src: str | os.PathLike) -> ModelConfig:
    file = Path(src) / MODEL_CONFIG_FILE
    d = read_json(file, hf.ConversionError,
                  "no such file (not a directory written by `clara convert from-hf`)",
                  "model config")
    return model_config_from_dict(d, str(file))


def fresh_tmp(dst: Path, overwrite: bool) -> Path:
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not overwrite:
        raise hf.ConversionError(f"{dst}: exists and is not empty (pass --overwrite)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.tmp-"))


def _save_params(directory: Path, params) -> None:
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory.absolute(), params)
        ckptr.wait_until_finished()


def load_params(src: str | os.PathLike, cfg: ModelConfig | None = None, shardings=None):
    """(cfg, params) from a from-hf directory, restored onto `shardings` (a tree matching the
    params) or the host CPU."""
    import orbax.checkpoint as ocp

    src = Path(src)
    cfg = read_model_config(src) if cfg is None else cfg
    abstract = abstract_params(cfg)
    if shardings is None:
        cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
        shardings = jax.tree.map(lambda _: cpu, abstract)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
    params_dir = (src / PARAMS_DIR).absolute()
    if not params_dir.exists():
        raise hf.ConversionError(f"{params_dir}: no such directory")
    with ocp.StandardCheckpointer() as ckptr:
        # The stored dtypes win (the base may have been written as bfloat16).
        stored = ckptr.metadata(params_dir).item_metadata.tree
        target = jax.tree.map(
            lambda t, m: jax.ShapeDtypeStruct(t.shape, m.dtype, sharding=t.sharding),
            target, stored)
        params = ckptr.restore(params_dir, target)
    return cfg, params


def write_contents(directory: Path, cfg: ModelConfig, params, hf_config: dict, tok,
                   extra_dirs: list[Path]) -> None:
    """Writes a converted directory's files (layout in the module doc) into `directory`.
    HF_EXTRA_FILES are copied from the first of `extra_dirs` that holds each."""
    _save_params(directory / PARAMS_DIR, params)
    (directory / MODEL_CONFIG_FILE).write_text(
        json.dumps(model_config_to_dict(cfg), indent=2) + "\n")
    (directory / HF_CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
    if tok is not None:
        tok.save(directory)
    for name in HF_EXTRA_FILES:
        found = next((d / name for d in extra_dirs if (d / name).exists()), None)
        if found is not None:
            (directory / HF_FILES_DIR).mkdir(exist_ok=True)
            shutil.copy2(found, directory / HF_FILES_DIR / name)


def from_hf(src: str | os.PathLike, dst: str | os.PathLike, *, tokenizer: bool = True,
            seed: int = 0, param_dtype: str = "float32", overwrite: bool = False,
            progress: bool = True, **overrides) -> dict:
    """Converts a Hugging Face checkpoint directory into DST (layout in the module doc).

    With `tokenizer`, SRC/tokenizer.json is loaded with the CLaRa special tokens added
    (`clara_jax.data.tokenizer.HFTokenizer`) and the vocabulary grows to hold them.
    Returns a summary dict (model config, vocab sizes, seconds).
    """
    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    hf_config = hf.read_hf_config(src)
    cfg0 = hf.model_config_from_hf(hf_config, where=str(src / hf.CONFIG_FILE), **overrides)
    tok = None
    min_vocab = None
    if tokenizer:
        from clara_jax.data.tokenizer import HFTokenizer

        if not (src / TOKENIZER_FILE).exists():
            raise hf.ConversionError(f"{src / TOKENIZER_FILE}: no such file (pass "
                                     "--notokenizer to convert the weights alone)")
        tok = HFTokenizer.from_file(src, cfg0.num_memory_tokens)
        min_vocab = tok.vocab_size
    tmp = fresh_tmp(dst, overwrite)
    try:
        cfg, params = hf.load(src, min_vocab_size=min_vocab, seed=seed,
                              param_dtype=param_dtype, progress=progress, **overrides)
        write_contents(tmp, cfg, params, hf_config, tok, [src])
        replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"src": str(src), "dst": str(dst), "model_type": hf_config.get("model_type"),
            "checkpoint_vocab_size": cfg0.vocab_size, "vocab_size": cfg.vocab_size,
            "tokenizer_vocab_size": None if tok is None else tok.vocab_size,
            "seconds": round(time.perf_counter() - start, 3),
            "model_config": model_config_to_dict(cfg)}


def to_hf(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: str = "float32",
          max_shard_bytes: int = hf.DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
          progress: bool = True) -> dict:
    """Writes the base decoder of a from-hf directory SRC as a Hugging Face directory DST:
    config.json (from SRC/hf_config.json when present), safetensors, tokenizer.json and the
    kept extra files."""
    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    cfg, params = load_params(src)
    template = None
    if (src / HF_CONFIG_FILE).exists():
        template = json.loads((src / HF_CONFIG_FILE).read_text())
    extra = {}
    if (src / TOKENIZER_FILE).exists():
        extra[TOKENIZER_FILE] = src / TOKENIZER_FILE
    if (src / HF_FILES_DIR).is_dir():
        extra.update({p.name: p for p in sorted((src / HF_FILES_DIR).iterdir())})
    hf.save(cfg, params, dst, hf_config=template, dtype=dtype, max_shard_bytes=max_shard_bytes,
            overwrite=overwrite, progress=progress, extra_files=extra)
    return {"src": str(src), "dst": str(dst), "files": sorted(p.name for p in dst.iterdir()),
            "seconds": round(time.perf_counter() - start, 3)}
