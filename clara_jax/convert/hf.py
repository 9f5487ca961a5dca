"""Hugging Face Llama / Mistral / Qwen2 checkpoints in and out of the project's params.

    cfg, params = load("path/to/hf_dir", num_memory_tokens=16)      # config.json + safetensors
    save(cfg, params, "path/to/out_dir", hf_config=original_config)  # the base decoder only

`load` returns the full CLaRa params tree: the base decoder from the checkpoint; LoRA adapters,
memory embeddings and latent projections freshly initialised from `seed` with the model's own
initialisers (every adapter's B is zero, so the model's outputs equal the checkpoint's). Both
layer layouts are filled: `layers_{i}` and, with `scan_layers=True`, one stacked `layers`
subtree with a leading [n_layers] axis.

Weights move tensor by tensor: `safe_open` reads one tensor, it is reshaped and cast, and placed
into the output; the checkpoint is never held in memory as a whole next to the params. `save`
streams each tensor into its shard file the same way.

Layout mapping (HF `nn.Linear` weights are [out, in]; ours are [in..., out...]):
    q/k/v_proj.weight [n*H, D] -> attn/{q,k,v}/kernel [D, n, H]     (n = N or G)
    q/k/v_proj.bias   [n*H]    -> attn/{q,k,v}/bias   [n, H]        (Qwen2)
    o_proj.weight     [D, N*H] -> attn/o/kernel       [N, H, D]
    gate/up_proj      [F, D]   -> mlp/{gate,up}/kernel [D, F];  down_proj [D, F] -> [F, D]
    embed_tokens      [V, D]   -> embedding [V, D];  lm_head [V, D] -> unembed [D, V]
RoPE here is the half-split layout HF uses for these families, so q/k need no permutation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from clara_jax.config import base_config
from clara_jax.fileio import read_json, replace_dir
from clara_jax.model import ModelConfig, abstract_params, init_params, param_group
from clara_jax.model.api import INIT_COMPILER_OPTIONS
from clara_jax.param_store import path_keys, path_name

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# model_type -> the architecture its checkpoints name.
SUPPORTED = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
             "qwen2": "Qwen2ForCausalLM"}

# ModelConfig fields that config.json determines; overriding them would misread the weights.
HF_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "mlp_dim",
             "rope_theta", "norm_eps", "qkv_bias", "tie_embeddings")
# How the compressor writes latents and the generator reads them. No parameter depends on
# them and a Hugging Face checkpoint has no compressor yet, so it takes the run's.
LAYOUT_FIELDS = ("memory_layout", "compressor_attention", "latent_span", "span_code",
                 "span_code_period")
# Fields the checkpoint does not know; `load` takes them from keyword overrides.
OVERRIDABLE = ("num_memory_tokens", "latent_dim", "max_len", "scan_layers", "remat", "dtype",
               "base_dtype", "init_std", "lora_rank", "lora_alpha", "lora_dropout",
               "lora_targets", "adapters", "span_head_rate", *LAYOUT_FIELDS)
DEFAULT_NUM_MEMORY_TOKENS = 16  # 256-token documents at 16x compression, as in the paper
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # transformers' default shard size

_ST_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
              "BF16": np.dtype(jnp.bfloat16), "F64": np.dtype(np.float64)}
_ST_CODES = {v: k for k, v in _ST_DTYPES.items()}


class ConversionError(ValueError):
    """An unsupported or malformed checkpoint; the message names the file and the field."""


# ----------------------------------------------------------------------------- config.json


def read_hf_config(path: str | os.PathLike) -> dict:
    """config.json of a checkpoint directory (or the file itself) as a dict."""
    path = Path(path)
    file = path / CONFIG_FILE if path.is_dir() else path
    config = read_json(file, ConversionError,
                       f"no such file (a Hugging Face checkpoint directory holds {CONFIG_FILE} "
                       "and safetensors files)", "model config")
    if not isinstance(config, dict):
        raise ConversionError(f"{file}: expected a JSON object")
    return config


def _rope_theta(hf: dict, where: str) -> float:
    """RoPE base from either config style: transformers 4 (`rope_theta`, `rope_scaling`) or 5
    (`rope_parameters`). Any scaling (linear, dynamic, yarn, llama3, ...) is refused."""
    scaling = hf.get("rope_scaling")
    if scaling:
        raise ConversionError(f"{where}: field 'rope_scaling'={scaling!r}: RoPE scaling is not "
                              "supported (only plain RoPE)")
    theta = hf.get("rope_theta")
    params = hf.get("rope_parameters")
    if params:
        if not isinstance(params, dict):
            raise ConversionError(f"{where}: field 'rope_parameters'={params!r}: expected an "
                                  "object")
        kind = params.get("rope_type", "default")
        extra = sorted(set(params) - {"rope_type", "rope_theta"})
        if kind != "default" or extra:
            raise ConversionError(
                f"{where}: field 'rope_parameters'={params!r}: only rope_type 'default' with "
                "rope_theta is supported (RoPE scaling and partial rotary are not)")
        if "rope_theta" in params:
            if theta is not None and float(theta) != float(params["rope_theta"]):
                raise ConversionError(
                    f"{where}: field 'rope_theta'={theta} disagrees with "
                    f"'rope_parameters.rope_theta'={params['rope_theta']}")
            theta = params["rope_theta"]
    return float(10000.0 if theta is None else theta)


def _refuser(hf: dict, where: str) -> Callable[[str, str], None]:
    def refuse(field, why):
        raise ConversionError(f"{where}: field '{field}'={hf.get(field)!r}: {why}")
    return refuse


def _check_architecture(hf: dict, refuse: Callable[[str, str], None]) -> str:
    """Fails on a config.json this converter cannot read; returns its model_type."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED:
        refuse("model_type", f"unsupported model type; supported: {', '.join(SUPPORTED)}")
    archs = hf.get("architectures") or [SUPPORTED[model_type]]
    if list(archs) != [SUPPORTED[model_type]]:
        refuse("architectures", f"expected [{SUPPORTED[model_type]!r}] for model_type "
                                f"{model_type!r}")
    if hf.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "only 'silu' (SwiGLU) is supported")
    if hf.get("quantization_config"):
        refuse("quantization_config", "quantized checkpoints are not supported")
    if float(hf.get("attention_dropout") or 0.0) != 0.0:
        refuse("attention_dropout", "attention dropout is not implemented")
    if model_type == "llama":
        for field in ("attention_bias", "mlp_bias"):
            if hf.get(field):
                refuse(field, "biases in Llama attention/MLP projections are not supported")
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "vocab_size"):
        if not isinstance(hf.get(field), int) or hf[field] <= 0:
            refuse(field, "missing, or not a positive integer")
    return model_type


def _check_overrides(overrides: dict, where: str) -> None:
    unknown = sorted(set(overrides) - set(OVERRIDABLE) - set(HF_FIELDS))
    if unknown:
        raise ConversionError(f"unknown ModelConfig override(s) {unknown}; the checkpoint sets "
                              f"{list(HF_FIELDS)}, overrides may set {list(OVERRIDABLE)}")
    fixed = sorted(set(overrides) & set(HF_FIELDS))
    if fixed:
        raise ConversionError(f"override(s) {fixed} come from {where} and cannot be changed")


def _check_full_attention(hf: dict, model_type: str, max_len: int,
                          refuse: Callable[[str, str], None]) -> None:
    """Fails if sliding-window attention would be in use for sequences up to `max_len`."""
    if model_type == "qwen2":
        window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
        window_field = "use_sliding_window"
    else:
        window = hf.get("sliding_window")
        window_field = "sliding_window"
    if window is not None and int(window) < max_len:
        refuse(window_field, f"sliding-window attention (window {window}) is not implemented "
                             f"and would be in use for sequences up to max_len={max_len}; pass "
                             f"max_len<={window} to convert for shorter sequences")
    layer_types = hf.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        if window is None or int(window) < max_len:
            refuse("layer_types", "only 'full_attention' layers are supported")


def _project_model_defaults() -> dict:
    """The OVERRIDABLE fields' values when `load` is given none: the project's config."""
    c = base_config()
    return dict(
        num_memory_tokens=DEFAULT_NUM_MEMORY_TOKENS, latent_dim=c.model.latent_dim,
        scan_layers=c.model.scan_layers, remat=c.model.remat, dtype=c.model.dtype,
        base_dtype=c.model.base_dtype, init_std=c.model.init_std, lora_rank=c.model.lora.rank,
        lora_alpha=float(c.model.lora.alpha), lora_dropout=float(c.model.lora.dropout),
        lora_targets=tuple(c.model.lora.targets), adapters=tuple(c.model.lora.adapters),
        span_head_rate=0,
        **{f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name in LAYOUT_FIELDS})


def model_config_from_hf(hf: dict, where: str = CONFIG_FILE, **overrides) -> ModelConfig:
    """The ModelConfig of a checkpoint's config.json; fields the checkpoint does not have come
    from `overrides` (see OVERRIDABLE), else the project defaults (`clara_jax.config`).

    Refuses, naming the field: an unknown model_type or architecture, an activation other than
    SiLU, RoPE scaling, sliding-window attention that would be in use within `max_len`,
    attention or MLP biases Llama allows, attention dropout, quantized weights.
    """
    refuse = _refuser(hf, where)
    model_type = _check_architecture(hf, refuse)
    _check_overrides(overrides, where)

    n_heads = hf["num_attention_heads"]
    n_kv_heads = hf.get("num_key_value_heads") or n_heads
    head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
    if n_heads % n_kv_heads:
        refuse("num_key_value_heads", f"must divide num_attention_heads={n_heads}")
    if head_dim % 2:
        refuse("head_dim", f"head dim {head_dim} is odd; RoPE rotates pairs")
    max_len = int(overrides.get("max_len", hf.get("max_position_embeddings") or 4096))
    _check_full_attention(hf, model_type, max_len, refuse)

    fields = {**_project_model_defaults(), **overrides, "max_len": max_len}
    for key in ("lora_targets", "adapters"):
        fields[key] = tuple(fields[key])
    return ModelConfig(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
        mlp_dim=hf["intermediate_size"], rope_theta=_rope_theta(hf, where),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), qkv_bias=model_type == "qwen2",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), **fields)


def check_shapes_match(cfg: ModelConfig, exp: ModelConfig) -> None:
    """Refuses a checkpoint whose shapes differ from the experiment config's. The vocabulary
    is exempt: the converted one grows by the special tokens (reported in the summary)."""
    bad = [f"config.model.{k}={getattr(exp, k)!r} but the checkpoint has {getattr(cfg, k)!r}"
           for k in HF_FIELDS if k != "vocab_size" and getattr(cfg, k) != getattr(exp, k)]
    if bad:
        raise ConversionError("the checkpoint does not match --config: " + "; ".join(bad))


def hf_config_from_model_config(cfg: ModelConfig, template: dict | None = None,
                                model_type: str | None = None,
                                dtype: str = "float32") -> dict:
    """A config.json for the base decoder of `cfg`.

    `template` (the checkpoint's original config.json) keeps its other fields (token ids,
    generation settings); the shape fields are rewritten from `cfg`. Without a template the
    model type is `model_type`, else qwen2 when cfg has q/k/v biases, else llama.
    """
    out = dict(template or {})
    model_type = model_type or out.get("model_type") or ("qwen2" if cfg.qkv_bias else "llama")
    if model_type not in SUPPORTED:
        raise ConversionError(f"model_type {model_type!r} unsupported; supported: "
                              f"{', '.join(SUPPORTED)}")
    if cfg.qkv_bias != (model_type == "qwen2"):
        raise ConversionError(f"model_type {model_type!r} cannot hold qkv_bias={cfg.qkv_bias} "
                              "(q/k/v biases exist exactly in qwen2)")
    for key in ("rope_scaling", "rope_parameters", "torch_dtype", "dtype"):
        out.pop(key, None)
    out.update({
        "architectures": [SUPPORTED[model_type]], "model_type": model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
        "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
        # A max_len chosen below the checkpoint's (e.g. inside its sliding window) is ours.
        "max_position_embeddings": max(cfg.max_len, out.get("max_position_embeddings") or 0),
        "tie_word_embeddings": cfg.tie_embeddings,
        # Both spellings: transformers 4 reads rope_theta, 5 reads rope_parameters.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "torch_dtype": dtype,
    })
    if model_type == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    if model_type == "qwen2" and out.get("layer_types"):
        out["layer_types"] = ["full_attention"] * cfg.n_layers
    return out


# ----------------------------------------------------------------------------- tensor map


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One checkpoint tensor and where it lives in our tree.

    path: keys below params['decoder'] (for per-layer tensors, below the layer's subtree);
    layer: the layer index or None; kind: how the layout differs (see `_to_ours`).
    """

    name: str
    path: tuple[str, ...]
    layer: int | None
    kind: str
    hf_shape: tuple[int, ...]


def _tensor_map(cfg: ModelConfig) -> list[_Tensor]:
    d, n, g, h, f, v = (cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim,
                        cfg.vocab_size)
    out = [_Tensor("model.embed_tokens.weight", ("embedding",), None, "same", (v, d))]
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        layer = [
            ("input_layernorm.weight", ("attn_norm", "scale"), "same", (d,)),
            ("self_attn.q_proj.weight", ("attn", "q", "kernel"), "qkv", (n * h, d)),
            ("self_attn.k_proj.weight", ("attn", "k", "kernel"), "qkv", (g * h, d)),
            ("self_attn.v_proj.weight", ("attn", "v", "kernel"), "qkv", (g * h, d)),
            ("self_attn.o_proj.weight", ("attn", "o", "kernel"), "o", (d, n * h)),
            ("post_attention_layernorm.weight", ("mlp_norm", "scale"), "same", (d,)),
            ("mlp.gate_proj.weight", ("mlp", "gate", "kernel"), "t", (f, d)),
            ("mlp.up_proj.weight", ("mlp", "up", "kernel"), "t", (f, d)),
            ("mlp.down_proj.weight", ("mlp", "down", "kernel"), "t", (d, f)),
        ]
        if cfg.qkv_bias:
            layer += [
                ("self_attn.q_proj.bias", ("attn", "q", "bias"), "bias", (n * h,)),
                ("self_attn.k_proj.bias", ("attn", "k", "bias"), "bias", (g * h,)),
                ("self_attn.v_proj.bias", ("attn", "v", "bias"), "bias", (g * h,)),
            ]
        out += [_Tensor(p + name, path, i, kind, shape) for name, path, kind, shape in layer]
    out.append(_Tensor("model.norm.weight", ("final_norm", "scale"), None, "same", (d,)))
    if not cfg.tie_embeddings:
        out.append(_Tensor("lm_head.weight", ("unembed",), None, "t", (v, d)))
    return out


def _to_ours(x: np.ndarray, kind: str, our_shape: tuple[int, ...]) -> np.ndarray:
    """HF layout -> ours. x: the HF tensor; our_shape: the leaf's shape (per layer)."""
    if kind in ("qkv", "o", "t"):
        x = x.T  # [out, in] -> [in, out]
    return x.reshape(our_shape)


def _to_hf(x: np.ndarray, kind: str, hf_shape: tuple[int, ...]) -> np.ndarray:
    """Our layout -> HF. x: our leaf (one layer's slice)."""
    if kind == "qkv":
        return x.reshape(x.shape[0], -1).T  # [D, n, H] -> [n*H, D]
    if kind == "o":
        return x.reshape(-1, x.shape[-1]).T  # [N, H, D] -> [D, N*H]
    if kind == "t":
        return x.T
    return x.reshape(hf_shape)


def _leaf_key(t: _Tensor, scan_layers: bool) -> tuple[str, ...]:
    """The tensor's leaf path in params: ('decoder', ...)."""
    if t.layer is None:
        return ("decoder",) + t.path
    return ("decoder", "layers" if scan_layers else f"layers_{t.layer}") + t.path


# ----------------------------------------------------------------------------- reading


def checkpoint_files(path: str | os.PathLike) -> dict[str, Path]:
    """Tensor name -> safetensors file, from model.safetensors.index.json or the single file."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConversionError(f"{index}: not a safetensors index (needs a 'weight_map' "
                                  f"object): {e}") from e
        files = {}
        for name, file in weight_map.items():
            f = path / file
            if not f.exists():
                raise ConversionError(f"{index}: field 'weight_map.{name}': file {file!r} "
                                      "does not exist")
            files[name] = f
        return files
    single = path / SINGLE_FILE
    if single.exists():
        with _safe_open(single, "numpy") as f:
            return {name: single for name in f.keys()}
    others = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in
                                                                  path.glob("*.pth"))
    hint = f" (found {others}: PyTorch pickles are not read; save as safetensors)" if others \
        else ""
    raise ConversionError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE}{hint}")


@contextlib.contextmanager
def _safe_open(file: Path, framework: str):
    """`safetensors.safe_open` whose errors (a truncated or garbled file) are ConversionErrors
    naming the file."""
    try:
        with safe_open(str(file), framework=framework) as f:
            yield f
    except SafetensorError as e:
        raise ConversionError(f"{file}: not a readable safetensors file ({e}); it is "
                              "truncated or corrupted") from None


def _cpu_device():
    return jax.local_devices(backend="cpu")[0]


def _read_tensors(files: dict[str, Path], names: set[str], progress: bool
                  ) -> Iterator[tuple[str, Path, np.ndarray]]:
    """Yields (name, file, array) for `names`, one tensor at a time, file by file."""
    by_file: dict[Path, list[str]] = {}
    for name in sorted(names):
        by_file.setdefault(files[name], []).append(name)
    bar = tqdm(total=len(names), desc="reading tensors", unit="tensor", disable=not progress)
    # The flax framework is the one that returns bfloat16 (numpy has no such dtype); keep the
    # copy on the host whatever the default backend is.
    with jax.default_device(_cpu_device()):
        for file in sorted(by_file):
            with _safe_open(file, "flax") as f:
                for name in by_file[file]:
                    code = f.get_slice(name).get_dtype()
                    if code not in _ST_DTYPES:
                        raise ConversionError(f"{file}: tensor {name!r} has dtype {code}; only "
                                              f"floating tensors {sorted(_ST_DTYPES)} are read")
                    yield name, file, np.asarray(f.get_tensor(name))
                    bar.update(1)
    bar.close()


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype, align: int = 64) -> np.ndarray:
    """np.empty aligned to `align` bytes: jax.device_put onto the CPU then aliases the buffer
    instead of copying it, so a converted leaf exists once in host memory."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


# ModelConfig fields that shape only the base decoder or the forward pass, not the parts
# `load` initialises: fixing them lets every checkpoint of one width share a compiled init.
# vocab_size stays real when the config has a span head, which reads out over the vocabulary.
_INIT_NEUTRAL = dict(vocab_size=8, rope_theta=10000.0, norm_eps=1e-5, qkv_bias=False,
                     tie_embeddings=False, max_len=8, scan_layers=True, remat="none",
                     dtype="float32", base_dtype="float32", lora_dropout=0.0)


@functools.lru_cache(maxsize=8)
def _non_base_init(init_cfg: ModelConfig):
    """A jitted key -> {'a/b/c': leaf} of the non-base leaves of `init_params(init_cfg, key)`.

    Under jit the base initialisers feed no output and are compiled away, so the decoder's
    weights are never allocated twice. `init_cfg` scans its layers: compiling the unrolled
    per-layer init takes seconds per layer.
    """
    def init(key):
        leaves = jax.tree_util.tree_leaves_with_path(init_params(init_cfg, key))
        return {path_name(p): x for p, x in leaves if param_group(p) != "base"}

    return jax.jit(init, compiler_options=INIT_COMPILER_OPTIONS)


def _fresh_non_base(cfg: ModelConfig, seed: int) -> dict[tuple[str, ...], jax.Array]:
    """The adapters, memory embeddings, latent projections and span head for `cfg`: as
    `init_params` draws them for the scanned-layer form of `cfg` (with `_INIT_NEUTRAL`) from
    `seed`, then split into `layers_{i}` when `cfg` does not scan. Same seed and shapes, same
    values."""
    neutral = dict(_INIT_NEUTRAL)
    if cfg.span_head_rate:
        del neutral["vocab_size"]
    with jax.default_device(_cpu_device()):
        out = _non_base_init(dataclasses.replace(cfg, **neutral))(jax.random.key(seed))
    result = {}
    for name, leaf in out.items():
        keys = tuple(name.split("/"))
        if keys[:2] == ("decoder", "layers") and not cfg.scan_layers:
            for i in range(cfg.n_layers):
                result[("decoder", f"layers_{i}") + keys[2:]] = leaf[i]
        else:
            result[keys] = leaf
    return result


def _load_config(path: Path, hf_config: dict, param_dtype: str | None,
                 min_vocab_size: int | None, vocab_multiple: int,
                 overrides: dict) -> tuple[ModelConfig, int]:
    """The ModelConfig `load` builds (base_dtype and grown vocabulary set) and the checkpoint's
    own vocabulary size."""
    cfg = model_config_from_hf(hf_config, where=str(path / CONFIG_FILE), **overrides)
    if param_dtype is None:
        param_dtype = cfg.base_dtype
    if param_dtype not in ("float32", "bfloat16"):
        raise ConversionError(f"param_dtype={param_dtype!r}: must be 'float32' or 'bfloat16'")
    # The stored dtype and the config agree, so that a restore against `abstract_params(cfg)`
    # (checkpoints, `clara train --init_from_hf`) keeps it.
    cfg = dataclasses.replace(cfg, base_dtype=param_dtype)
    hf_vocab = cfg.vocab_size
    if min_vocab_size is not None and min_vocab_size > hf_vocab:
        cfg = dataclasses.replace(cfg, vocab_size=_round_up(min_vocab_size, vocab_multiple))
    return cfg, hf_vocab


def _first_eight(names: list[str]) -> str:
    return f"{names[:8]}" + (f" and {len(names) - 8} more" if len(names) > 8 else "")


def _check_tensor_names(path: Path, files: dict[str, Path], tensors: dict[str, _Tensor],
                        cfg: ModelConfig, model_type: str | None) -> None:
    """Fails unless the checkpoint holds exactly the tensors the config implies (a tied
    lm_head and rotary inv_freq buffers may be there too)."""
    missing = sorted(set(tensors) - set(files))
    if missing:
        raise ConversionError(f"{path}: tensors missing from the checkpoint: "
                              f"{_first_eight(missing)}")
    ignorable = {"lm_head.weight"} if cfg.tie_embeddings else set()
    unexpected = sorted(n for n in set(files) - set(tensors) - ignorable
                        if not n.endswith("rotary_emb.inv_freq"))
    if unexpected:
        raise ConversionError(
            f"{path}: tensors this {model_type} converter does not know (an "
            f"unsupported architecture variant?): {_first_eight(unexpected)}")


def _copy_converted(y: np.ndarray, x: np.ndarray, t: _Tensor, hf_vocab: int,
                    grown: bool) -> None:
    """Writes HF tensor `x` (t.hf_shape) into our buffer `y` (our shape, one layer's), cast on
    the way; with `grown`, embedding [V', D] / unembedding [D, V'] entries past `hf_vocab` get
    the mean of the checkpoint's rows."""
    # One copy: the transposes and reshapes are views.
    if t.name == "model.embed_tokens.weight" and grown:
        y[:hf_vocab] = x
        y[hf_vocab:] = x.mean(axis=0, dtype=np.float32)
    elif t.name == "lm_head.weight" and grown:
        y[:, :hf_vocab] = x.T
        y[:, hf_vocab:] = x.mean(axis=0, dtype=np.float32)[:, None]
    else:
        y[...] = _to_ours(x, t.kind, y.shape)


def _read_base(cfg: ModelConfig, hf_vocab: int, files: dict[str, Path],
               tensors: dict[str, _Tensor], flat_abstract: dict, progress: bool,
               place: Callable[[tuple[str, ...], np.ndarray], None]) -> None:
    """Reads every checkpoint tensor, converts it to our layout and hands each finished leaf
    to `place(key, array)`; stacked leaves (scan_layers) are filled layer by layer in one
    preallocated [n_layers, ...] buffer and placed once their last layer is in."""
    base_dtype = np.dtype(cfg.base_param_dtype)
    stacked: dict[tuple[str, ...], np.ndarray] = {}
    filled: dict[tuple[str, ...], int] = {}
    for name, file, x in _read_tensors(files, set(tensors), progress):
        t = tensors[name]
        if tuple(x.shape) != t.hf_shape:
            raise ConversionError(f"{file}: tensor {name!r} has shape {list(x.shape)}, but "
                                  f"{CONFIG_FILE} implies {list(t.hf_shape)}")
        key = _leaf_key(t, cfg.scan_layers)
        want = flat_abstract[key].shape
        layered = cfg.scan_layers and t.layer is not None
        if layered:
            if key not in stacked:
                stacked[key] = _aligned_empty(want, base_dtype)
                filled[key] = 0
            y = stacked[key][t.layer]
        else:
            y = _aligned_empty(want, base_dtype)
        _copy_converted(y, x, t, hf_vocab, cfg.vocab_size > hf_vocab)
        del x
        if layered:
            filled[key] += 1
            if filled[key] == cfg.n_layers:
                place(key, stacked.pop(key))
        else:
            place(key, y)
        del y


def _unflatten_checked(abstract, flat: dict[tuple[str, ...], jax.Array]):
    """The tree of `abstract`'s structure with the leaves of `flat` (emptied on the way)."""
    leaves = []
    for p, a in jax.tree_util.tree_leaves_with_path(abstract):
        key = path_keys(p)
        if flat[key].shape != a.shape:  # a bug here, not bad input: shapes were checked above
            raise AssertionError(f"{'/'.join(key)}: built {flat[key].shape}, want {a.shape}")
        leaves.append(flat.pop(key))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(abstract), leaves)


def load(path: str | os.PathLike, *, min_vocab_size: int | None = None,
         vocab_multiple: int = 64, seed: int = 0, param_dtype: str | None = None,
         shardings=None, progress: bool = True, **overrides) -> tuple[ModelConfig, dict]:
    """Reads a Llama / Mistral / Qwen2 checkpoint directory into (ModelConfig, params).

    path: a directory with config.json and model.safetensors or model.safetensors.index.json
      plus its shards.
    min_vocab_size: the number of token ids the model must embed (e.g. a tokenizer's size after
      adding <ENC>, <SEP> and <MEM i>). When larger than the checkpoint's vocabulary, the
      embedding (and unembedding) grow to that size rounded up to `vocab_multiple`; new rows
      are the mean of the existing ones, so their logit is the mean logit and the base model
      never prefers them.
    seed: the RNG seed for the parts the checkpoint does not have.
    param_dtype: 'float32' (master weights) or 'bfloat16' for the base decoder (it is frozen
      during CLaRa training; halves host memory for 7B); None: the `base_dtype` override,
      else float32. The returned config's `base_dtype` says which. Other params are float32.
    shardings: optional tree matching `abstract_params(cfg)` of jax Shardings; each leaf is
      placed as soon as it is complete (e.g. straight onto a mesh).
    overrides: ModelConfig fields the checkpoint lacks (num_memory_tokens, latent_dim, max_len,
      scan_layers, lora_*, ...).

    Returns params as a plain tree of jax arrays, in `init_params` layout.
    """
    path = Path(path)
    hf_config = read_hf_config(path)
    cfg, hf_vocab = _load_config(path, hf_config, param_dtype, min_vocab_size, vocab_multiple,
                                 overrides)
    files = checkpoint_files(path)
    tensors = {t.name: t for t in _tensor_map(dataclasses.replace(cfg, vocab_size=hf_vocab))}
    _check_tensor_names(path, files, tensors, cfg, hf_config.get("model_type"))

    abstract = abstract_params(cfg)
    flat_abstract = {path_keys(p): a for p, a in jax.tree_util.tree_leaves_with_path(abstract)}
    flat_shardings = None
    if shardings is not None:
        flat_shardings = {path_keys(p): s
                          for p, s in jax.tree_util.tree_leaves_with_path(shardings)}
    out: dict[tuple[str, ...], jax.Array] = {}

    def place(key, array):
        target = _cpu_device() if flat_shardings is None else flat_shardings[key]
        out[key] = jax.device_put(array, target)

    _read_base(cfg, hf_vocab, files, tensors, flat_abstract, progress, place)
    for key, x in _fresh_non_base(cfg, seed).items():
        place(key, x)
    return cfg, _unflatten_checked(abstract, out)


# ----------------------------------------------------------------------------- writing


def _write_safetensors(file: Path, entries: list[tuple[str, tuple[int, ...], np.dtype,
                                                        Callable[[], np.ndarray]]],
                       metadata: dict[str, str]) -> None:
    """Streams tensors into one safetensors file: the header is computed from shapes, then each
    tensor is produced by its callable, written, and dropped."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, shape, dtype, _ in entries:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _ST_CODES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format allows space padding; keeps data 8-aligned
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype, make in entries:
            x = np.ascontiguousarray(make(), dtype=dtype)
            if x.shape != tuple(shape):
                raise AssertionError(f"{name}: produced {x.shape}, header says {shape}")
            if x.dtype.byteorder == ">":
                x = x.byteswap()
            f.write(x.reshape(-1).view(np.uint8).data)  # bytes view: numpy has no bf16 buffer


def _leaf_getter(params) -> Callable[[tuple[str, ...]], object]:
    flat = {path_keys(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}
    return flat.__getitem__


_SAVE_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(jnp.bfloat16),
                "float16": np.dtype(np.float16)}

# (HF tensor name, HF shape, dtype, a callable producing the tensor) for `_write_safetensors`.
_Entry = tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]


def _save_entries(cfg: ModelConfig, params, np_dtype: np.dtype) -> list[_Entry]:
    """One entry per HF tensor of the base decoder, each converting its leaf (one layer's slice
    of a stacked leaf) only when called; fails if `params` does not match `cfg`'s shapes."""
    get = _leaf_getter(params)
    want = {path_keys(p): a.shape
            for p, a in jax.tree_util.tree_leaves_with_path(abstract_params(cfg))}
    entries = []
    for t in _tensor_map(cfg):
        key = _leaf_key(t, cfg.scan_layers)
        try:
            leaf = get(key)
        except KeyError:
            raise ConversionError(f"params has no leaf {'/'.join(key)} (does cfg.scan_layers="
                                  f"{cfg.scan_layers} match the params?)") from None
        if tuple(leaf.shape) != tuple(want[key]):
            raise ConversionError(f"params/{'/'.join(key)} has shape {tuple(leaf.shape)}, but "
                                  f"the model config implies {tuple(want[key])}")
        stacked = cfg.scan_layers and t.layer is not None

        def make(leaf=leaf, t=t, stacked=stacked):
            x = leaf[t.layer] if stacked else leaf
            return _to_hf(np.asarray(jax.device_get(x), np.float32), t.kind, t.hf_shape)

        entries.append((t.name, t.hf_shape, np_dtype, make))
    return entries


def _entry_bytes(e: _Entry) -> int:
    return math.prod(e[1]) * e[2].itemsize


def _shard_entries(entries: list[_Entry], max_shard_bytes: int) -> list[list[_Entry]]:
    """Consecutive entries packed into shards of at most `max_shard_bytes` (a larger single
    tensor gets a shard of its own)."""
    shards: list[list[_Entry]] = [[]]
    size = 0
    for e in entries:
        nbytes = _entry_bytes(e)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes
    return shards


def _write_shards(out_dir: Path, shards: list[list[_Entry]], progress: bool) -> None:
    """model.safetensors, or numbered shards with model.safetensors.index.json, in `out_dir`,
    with one progress tick per tensor written."""
    bar = tqdm(total=sum(map(len, shards)), desc="writing tensors", unit="tensor",
               disable=not progress)
    weight_map = {}
    for k, shard in enumerate(shards):
        name = SINGLE_FILE if len(shards) == 1 else \
            f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        counted = []
        for e in shard:
            def make(make=e[3]):
                x = make()
                bar.update(1)
                return x
            counted.append((e[0], e[1], e[2], make))
            weight_map[e[0]] = name
        _write_safetensors(out_dir / name, counted, {"format": "pt"})
    bar.close()
    if len(shards) > 1:
        total = sum(_entry_bytes(e) for shard in shards for e in shard)
        (out_dir / INDEX_FILE).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


def save(cfg: ModelConfig, params, path: str | os.PathLike, *, hf_config: dict | None = None,
         model_type: str | None = None, dtype: str = "float32",
         max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
         progress: bool = True, extra_files: dict[str, Path] | None = None) -> Path:
    """Writes the base decoder of `params` as a Hugging Face checkpoint directory.

    Files: config.json (see `hf_config_from_model_config`) and model.safetensors, or
    model-0000k-of-0000n.safetensors shards of at most `max_shard_bytes` each (a larger single
    tensor gets a shard of its own) with model.safetensors.index.json. Adapters, memory
    embeddings and latent projections are not part of the decoder and are not written.
    dtype: 'float32', 'bfloat16' or 'float16'. extra_files: name -> file copied alongside
    (tokenizer files, generation_config.json). Everything is written into a temporary
    directory beside `path` and renamed into place, so a failure leaves nothing half-written.
    """
    path = Path(path)
    if dtype not in _SAVE_DTYPES:
        raise ConversionError(f"dtype={dtype!r}: must be 'float32', 'bfloat16' or 'float16'")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise ConversionError(f"{path}: exists and is not empty (pass overwrite=True)")
    config = hf_config_from_model_config(cfg, hf_config, model_type, dtype)
    shards = _shard_entries(_save_entries(cfg, params, _SAVE_DTYPES[dtype]), max_shard_bytes)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        _write_shards(tmp, shards, progress)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name, file in (extra_files or {}).items():
            shutil.copy2(file, tmp / name)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
