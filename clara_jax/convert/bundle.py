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
      clara_config.json     from-clara only: the reference's config.json, the template for
                            `to-clara` and the source of the data lengths below

Such a directory holds no training run, so no experiment config: `experiment_config` derives
the one it is served with (`clara index` / `eval` / `ask` / `inspect` / `export
--checkpoint=DIR`, through `clara_jax.infer.serving.load_checkpoint_model`).

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

from clara_jax import param_store
from clara_jax.config import base_config
from clara_jax.convert import hf
from clara_jax.data.tokenizer import HFTokenizer
from clara_jax.fileio import read_json, replace_dir
from clara_jax.model import ModelConfig, abstract_params

MODEL_CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
HF_CONFIG_FILE = "hf_config.json"
HF_FILES_DIR = "hf_files"
TOKENIZER_FILE = "tokenizer.json"
REFERENCE_CONFIG_FILE = "clara_config.json"  # from-clara: the source's config.json
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


def is_converted(path: str | os.PathLike) -> bool:
    """Whether `path` holds this layout (model_config.json and params/). An export bundle
    (`clara_jax.export.bundle`) holds them too, beside its bundle.json."""
    path = Path(path)
    return (path / MODEL_CONFIG_FILE).is_file() and (path / PARAMS_DIR).is_dir()


def experiment_config(src: str | os.PathLike, cfg: ModelConfig):
    """The experiment config a converted directory SRC (model config `cfg`) is served with:
    `base_config()` with every model field from `cfg`, and the data fields from SRC's
    clara_config.json when there is one (from-clara), else the defaults:

        data.compression_rate  the reference's compr_rate (from-hf: 256 // M, at least 1;
                               `latent_span` when the latents are spread, the
                               sub-position code's period when it is on)
        data.doc_max_len       M * data.compression_rate (the reference's doc_max_length)
        data.chunk_overlap     min(32, doc_max_len // 4)
        data.num_docs          the reference's generation_top_k (default 5)
        data.answer_max_len    the reference's max_new_tokens (default 32)

    `ModelConfig.from_config` of the result is `cfg` again (an export bundle checks that)."""
    src = Path(src)
    reference = {}
    if (src / REFERENCE_CONFIG_FILE).is_file():
        reference = read_json(src / REFERENCE_CONFIG_FILE, hf.ConversionError,
                              "no such file", "reference CLaRa config")
        if not isinstance(reference, dict):
            raise hf.ConversionError(f"{src / REFERENCE_CONFIG_FILE}: expected a JSON object")
    c = base_config()
    m = c.model
    for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                 "mlp_dim", "num_memory_tokens", "latent_dim", "memory_layout",
                 "compressor_attention", "span_code", "qkv_bias",
                 "tie_embeddings", "max_len", "scan_layers", "remat", "dtype", "base_dtype"):
        m[name] = getattr(cfg, name)
    m.rope_theta, m.norm_eps, m.init_std = cfg.rope_theta, cfg.norm_eps, cfg.init_std
    m.latent_positions = "spread" if cfg.latent_span > 1 else "packed"
    m.span_head = bool(cfg.span_head_rate)
    m.lora.rank, m.lora.alpha, m.lora.dropout = cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout
    m.lora.targets, m.lora.adapters = tuple(cfg.lora_targets), tuple(cfg.adapters)
    n = cfg.num_memory_tokens
    if cfg.latent_span > 1 or cfg.span_code or cfg.span_head_rate:
        rate = max(cfg.latent_span, cfg.span_code_period, cfg.span_head_rate)
    elif isinstance(reference.get("compr_rate"), int) and reference["compr_rate"] > 0:
        rate = reference["compr_rate"]
    else:
        rate = max(1, 256 // n)
    d = c.data
    d.compression_rate, d.doc_max_len = rate, n * rate
    d.chunk_overlap = min(int(d.chunk_overlap), d.doc_max_len // 4)
    for field, ref_field in (("num_docs", "generation_top_k"),
                             ("answer_max_len", "max_new_tokens")):
        value = reference.get(ref_field)
        if isinstance(value, int) and value > 0:
            d[field] = value
    d.num_candidates = max(int(d.num_candidates), int(d.num_docs))
    back = ModelConfig.from_config(c)
    if dataclasses.replace(back, kernels_train=cfg.kernels_train) != cfg:  # a bug here
        raise AssertionError(f"{src}: the derived experiment config describes {back}, not "
                             f"{cfg}")
    return c


def fresh_tmp(dst: Path, overwrite: bool) -> Path:
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not overwrite:
        raise hf.ConversionError(f"{dst}: exists and is not empty (pass --overwrite)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.tmp-"))


def load_params(src: str | os.PathLike, cfg: ModelConfig | None = None, shardings=None):
    """(cfg, params) from a from-hf directory, restored onto `shardings` (a tree matching the
    params) or the host CPU."""
    src = Path(src)
    cfg = read_model_config(src) if cfg is None else cfg
    try:
        params = param_store.load_orbax(src / PARAMS_DIR, abstract_params(cfg), shardings)
    except FileNotFoundError as e:
        raise hf.ConversionError(str(e)) from None
    return cfg, params


def write_contents(directory: Path, cfg: ModelConfig, params, hf_config: dict, tok,
                   extra_dirs: list[Path]) -> None:
    """Writes a converted directory's files (layout in the module doc) into `directory`.
    HF_EXTRA_FILES are copied from the first of `extra_dirs` that holds each."""
    param_store.save_orbax(directory / PARAMS_DIR, params)
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
            seed: int = 0, param_dtype: str | None = None, overwrite: bool = False,
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
