"""The reference implementation's saved CLaRa models (apple/ml-clara) in and out.

    from_clara("CLaRa-7B-E2E/compression-16", "runs/clara7b", base="~/Mistral-7B-Instruct-v0.2")
    to_clara("runs/clara7b", "runs/clara7b_ref")

The reference (`openrlhf/models/modeling_clara.py`, `CLaRa.save_pretrained`) saves:
    config.json                     CLaRaConfig: decoder_model_name (the base decoder),
                                    doc_max_length / compr_rate (M = their quotient), lora_r,
                                    different_mem_tokens (<MEM0..M-1> or one shared <MEM>), sep
    adapters.pth                    {adapter: PEFT state dict} for encoder_adapter,
                                    decoder_adapter and (stage 2/3) query_reasoner_adapter:
                                    model.layers.{i}.{self_attn.q_proj,...,mlp.down_proj}
                                    .lora_{A,B}.weight (A [r, in], B [out, r]); PEFT may also
                                    keep copies of the resized embedding and lm_head
    decoder_first_last_layers.pth   {model.embed_tokens.weight, lm_head.weight}: [V', D] after
                                    the tokenizer grew by the memory tokens, <AE>, <ENC>, <SEP>
and rebuilds the tokenizer from the base decoder's by adding those tokens in that order.

Mapping to this project (the module doc of clara_jax.convert.hf has the base decoder's):
    encoder_adapter -> compressor, query_reasoner_adapter -> query, decoder_adapter -> generator
    lora_A.weight [r, in] -> lora_<name>_a [in..., r]; lora_B.weight [out, r] -> lora_<name>_b
      [r, out...]; alpha = 2 r (the reference's `_get_peft_config`), targets from the tensors
    embedding rows of the memory tokens -> memory_embeddings [M, D] (the reference feeds the
      compressor its <MEM> token embeddings; this project injects memory_embeddings there)
    latents: the final hidden states at the memory positions, no projection (latent_dim = 0)
Token ids are kept: the converted tokenizer is the reference's, with the ids this project adds
(`<pad>` if absent, `<MEM i>` when the reference shares one `<MEM>`) after them; their rows
are the mean embedding row (they are never read: slots are replaced by latents).

`to_clara` writes the same three files plus `decoder/`, the base decoder as a Hugging Face
directory with the reference's tokenizer, which config.json's decoder_model_name names. The
reference loads it with `CLaRa.from_pretrained(DST, training_stage="stage2")`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from pathlib import Path

import jax
import numpy as np
from tokenizers import AddedToken
from tokenizers import Tokenizer as RawTokenizer

from clara_jax.convert import bundle, hf
from clara_jax.convert.pth import PthError, read_pth, write_pth
from clara_jax.data.tokenizer import HF_FILE, META_FILE, HFTokenizer, load_tokenizer
from clara_jax.fileio import read_json, replace_dir
from clara_jax.model import ModelConfig, abstract_params
from clara_jax.param_store import path_keys

CLARA_CONFIG_FILE = "config.json"
ADAPTERS_FILE = "adapters.pth"
FIRST_LAST_FILE = "decoder_first_last_layers.pth"
BASE_DIR = "decoder"  # to_clara's base decoder, inside DST
# In a from-clara directory: the source's config.json, the template for to-clara.
KEPT_CONFIG_FILE = bundle.REFERENCE_CONFIG_FILE

ADAPTERS = {"encoder_adapter": "compressor", "query_reasoner_adapter": "query",
            "decoder_adapter": "generator"}
# PEFT's module path under a layer -> our LoRA target name; 'all-linear' is all seven.
MODULES = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v",
           "self_attn.o_proj": "o", "mlp.gate_proj": "gate", "mlp.up_proj": "up",
           "mlp.down_proj": "down"}
EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
# The reference's added tokens after the memory tokens (`_create_decoder_tokenizer`).
AFTER_MEMORY = ("<AE>", "<ENC>", "<SEP>")
# ModelConfig fields the reference checkpoint fixes: its shapes, and the published latent
# layout its compressor was trained with (appended memory tokens, causal attention, packed
# slots, no sub-position code).
FIXED = ("num_memory_tokens", "latent_dim", "lora_rank", "lora_alpha", "lora_targets",
         "adapters", *hf.LAYOUT_FIELDS)
REFERENCE_LORA_DROPOUT = 0.1  # `_get_peft_config`; it only matters when training
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(" +
                       "|".join(re.escape(m) for m in MODULES) +
                       r")\.lora_([AB])(?:\.[^.]+)?\.weight$")


def _read(file: Path):
    try:
        return read_pth(file)
    except PthError as e:
        raise hf.ConversionError(str(e)) from None


def _tensor_dict(obj, file: Path, what: str) -> dict[str, np.ndarray]:
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, np.ndarray)
                                            for k, v in obj.items()):
        raise hf.ConversionError(f"{file}: not a plain tensor dict ({what})")
    bad = sorted(k for k, v in obj.items() if v.dtype.kind != "f" and v.dtype.name != "bfloat16")
    if bad:
        raise hf.ConversionError(f"{file}: tensor {bad[0]!r} has dtype {obj[bad[0]].dtype}; "
                                 "only floating tensors are read")
    return obj


def reference_memory_tokens(clara_config: dict) -> list[str]:
    """The M memory-token strings the reference's tokenizer gives the compressor."""
    m = int(clara_config["doc_max_length"]) // int(clara_config["compr_rate"])
    if clara_config.get("different_mem_tokens"):
        return [f"<MEM{i}>" for i in range(m)]
    return ["<MEM>"] * m


def reference_tokenizer(raw, clara_config: dict):
    """`raw` (a tokenizers.Tokenizer, modified in place) with the tokens the reference adds, in
    its order; returns (raw, memory-token ids [M])."""
    mem = reference_memory_tokens(clara_config)
    added = list(dict.fromkeys(mem)) + list(AFTER_MEMORY)
    if clara_config.get("kbtc_training"):
        added.append("<KBTC>")
    for token in added:  # one by one: the ids must follow this order
        if raw.token_to_id(token) is None:
            raw.add_special_tokens([AddedToken(token, special=True, normalized=False)])
    return raw, [raw.token_to_id(t) for t in mem]


def read_clara_config(src: Path) -> dict:
    file = src / CLARA_CONFIG_FILE
    config = read_json(file, hf.ConversionError,
                       "no such file (a reference CLaRa directory holds config.json, "
                       f"{ADAPTERS_FILE} and {FIRST_LAST_FILE})", "CLaRa config")
    if not isinstance(config, dict):
        raise hf.ConversionError(f"{file}: expected a JSON object")

    def refuse(field, why):
        raise hf.ConversionError(f"{file}: field '{field}'={config.get(field)!r}: {why}")

    if config.get("model_type") != "CLaRa":
        refuse("model_type", "not a reference CLaRa config (expected 'CLaRa')")
    if not config.get("lora"):
        refuse("lora", "only the LoRA layout (adapters.pth) is read")
    if config.get("quantization", "no") != "no":
        refuse("quantization", "quantized checkpoints are not supported")
    for field in ("doc_max_length", "compr_rate", "lora_r"):
        if not isinstance(config.get(field), int) or config[field] <= 0:
            refuse(field, "missing, or not a positive integer")
    if config["doc_max_length"] // config["compr_rate"] < 1:
        refuse("compr_rate", f"leaves no memory token for doc_max_length="
                             f"{config['doc_max_length']}")
    return config


def _resolve_base(src: Path, config: dict, base) -> Path:
    if base is not None:
        base = Path(base).expanduser()
        if not base.is_dir():
            raise hf.ConversionError(f"--base={base}: no such directory")
        return base
    name = config.get("decoder_model_name")
    for candidate in ([Path(name).expanduser(), src / name] if isinstance(name, str) else []):
        if candidate.is_dir():
            return candidate
    raise hf.ConversionError(
        f"{src / CLARA_CONFIG_FILE}: field 'decoder_model_name'={name!r}: not a local "
        "directory; pass --base=DIR, the base decoder's Hugging Face directory")


def _read_adapters(file: Path, config: dict, cfg: ModelConfig):
    """{reference adapter: {(layer, target, 'A'|'B'): array}}, the rank, the targets, and the
    embedding copies PEFT kept ({name: array} in file order)."""
    tree = _read(file)
    if not isinstance(tree, dict) or not tree:
        raise hf.ConversionError(f"{file}: not a plain tensor dict ({{adapter: {{name: "
                                 "tensor}}}})")
    unknown = sorted(set(tree) - set(ADAPTERS))
    if unknown:
        raise hf.ConversionError(f"{file}: unknown adapter(s) {unknown}; known: "
                                 f"{list(ADAPTERS)}")
    r = config["lora_r"]
    d, n, g, h, f = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim
    fan = {"q": (d, n * h), "k": (d, g * h), "v": (d, g * h), "o": (n * h, d),
           "gate": (d, f), "up": (d, f), "down": (f, d)}
    out, copies, targets = {}, [], set()
    for name, state in tree.items():
        state = _tensor_dict(state, file, f"adapter {name!r}: {{name: tensor}}")
        factors = {}
        for key, x in state.items():
            if key in (EMBED, LM_HEAD):
                copies.append((key, x))
                continue
            m = _LORA_KEY.match(key)
            if m is None:
                raise hf.ConversionError(f"{file}: adapter {name!r} has tensor {key!r}, which "
                                         "is not a LoRA factor of a decoder layer's linear")
            layer, target, ab = int(m.group(1)), MODULES[m.group(2)], m.group(3)
            fan_in, fan_out = fan[target]
            want = (r, fan_in) if ab == "A" else (fan_out, r)
            if x.ndim == 2 and (x.shape[0] if ab == "A" else x.shape[1]) != r:
                rank = x.shape[0] if ab == "A" else x.shape[1]
                raise hf.ConversionError(
                    f"{file}: adapter {name!r} tensor {key!r} has rank {rank}, but "
                    f"{CLARA_CONFIG_FILE} has lora_r={r}")
            if tuple(x.shape) != want or layer >= cfg.n_layers:
                raise hf.ConversionError(f"{file}: adapter {name!r} tensor {key!r} has shape "
                                         f"{list(x.shape)}; the base decoder implies "
                                         f"{list(want)} for {cfg.n_layers} layers")
            factors[(layer, target, ab)] = x
            targets.add(target)
        out[name] = factors
    ordered = tuple(t for t in MODULES.values() if t in targets)
    for name, factors in out.items():
        missing = [f"model.layers.{i}.{m}.lora_{ab}.weight" for i in range(cfg.n_layers)
                   for m, t in MODULES.items() if t in targets for ab in "AB"
                   if (i, t, ab) not in factors]
        if missing:
            raise hf.ConversionError(f"{file}: adapter {name!r} lacks {missing[0]}"
                                     + (f" and {len(missing) - 1} more" if len(missing) > 1
                                        else ""))
    return out, ordered, copies


def _to_ours(x: np.ndarray, ab: str, target: str, cfg: ModelConfig) -> np.ndarray:
    """A PEFT factor -> our layout: A [r, in] -> [in..., r]; B [out, r] -> [r, out...]."""
    y = x.astype(np.float32).T
    if ab == "A" and target == "o":
        return y.reshape(cfg.n_heads, cfg.head_dim, -1)
    if ab == "B" and target in ("q", "k", "v"):
        heads = cfg.n_heads if target == "q" else cfg.n_kv_heads
        return y.reshape(-1, heads, cfg.head_dim)
    return y


def _to_peft(x: np.ndarray, ab: str) -> np.ndarray:
    """The inverse of `_to_ours`: [in..., r] -> [r, in]; [r, out...] -> [out, r]."""
    if ab == "A":
        return x.reshape(-1, x.shape[-1]).T
    return x.reshape(x.shape[0], -1).T


def _layer_leaf(cfg: ModelConfig, layer: int, target: str, adapter: str, ab: str):
    """(leaf path, index into it or None) of one layer's adapter factor in our params."""
    block = ("attn",) if target in ("q", "k", "v", "o") else ("mlp",)
    leaf = block + (target, f"lora_{adapter}_{ab.lower()}")
    if cfg.scan_layers:
        return ("decoder", "layers") + leaf, layer
    return ("decoder", f"layers_{layer}") + leaf, None


def _with_rows(x: np.ndarray, rows: int, dtype) -> np.ndarray:
    """x [V', D] as [rows, D]: cut, or grown by mean rows (never preferred by the base)."""
    out = np.empty((rows, x.shape[1]), dtype)
    keep = min(rows, x.shape[0])
    out[:keep] = x[:keep]
    if rows > keep:
        out[keep:] = x.astype(np.float32).mean(axis=0)
    return out


def _reference_tokenizer_and_rows(src: Path, base: Path, config: dict, probe, first_last: dict,
                                  copies: list):
    """The reference's tokenizer (SRC's tokenizer.json, else the base's) with its added
    tokens, and its effective embedding rows checked against it and the base width. Returns
    (tokenizer, its directory, {EMBED, LM_HEAD: [V', D] or None}, memory token ids, V')."""
    tok_dir = src if (src / bundle.TOKENIZER_FILE).exists() else base
    tok_file = tok_dir / bundle.TOKENIZER_FILE
    if not tok_file.exists():
        raise hf.ConversionError(f"{tok_file}: no such file (nor in {src}); the token ids of "
                                 "the memory and special tokens come from the tokenizer")
    try:
        raw = RawTokenizer.from_file(str(tok_file))
    except Exception as e:  # the tokenizers package raises a bare Exception
        raise hf.ConversionError(f"{tok_file}: not a Hugging Face tokenizer.json: {e}") from e
    raw, mem_ids = reference_tokenizer(raw, config)
    ref_vocab = raw.get_vocab_size(with_added_tokens=True)
    # The reference's effective embedding: first_last, then each adapter's PEFT copy as
    # `load_adapter` loads them in file order (they are equal when saved together).
    rows = {EMBED: first_last[EMBED], LM_HEAD: first_last.get(LM_HEAD)}
    for key, x in copies:
        rows[key] = x
    for key, x in rows.items():
        if x is not None and (x.ndim != 2 or x.shape != (ref_vocab, probe.dim)):
            raise hf.ConversionError(
                f"{src / FIRST_LAST_FILE}: tensor {key!r} has shape {list(x.shape)}, but the "
                f"tokenizer ({tok_file} with the reference's added tokens) has {ref_vocab} "
                f"ids and the base decoder width {probe.dim}")
    tok_config_file = tok_dir / "tokenizer_config.json"
    tok_config = json.loads(tok_config_file.read_text()) if tok_config_file.exists() else {}
    tok = HFTokenizer.from_raw(raw, tok_config, probe.num_memory_tokens, where=tok_file)
    return tok, tok_dir, rows, mem_ids, ref_vocab


def _with_reference_weights(cfg: ModelConfig, params, rows: dict, mem_ids, factors: dict):
    """`params` (from `hf.load`) with the reference's embedding rows, memory embeddings and
    adapter factors in place of the fresh ones."""
    flat = {path_keys(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}
    base_dtype = flat[("decoder", "embedding")].dtype
    flat[("decoder", "embedding")] = _with_rows(rows[EMBED], cfg.vocab_size, base_dtype)
    if not cfg.tie_embeddings:
        flat[("decoder", "unembed")] = _with_rows(rows[LM_HEAD], cfg.vocab_size,
                                                  base_dtype).T
    flat[("memory_embeddings",)] = rows[EMBED][mem_ids].astype(np.float32)
    for ref_name, ours in ADAPTERS.items():
        if ref_name not in factors:
            continue
        staged: dict[tuple, np.ndarray] = {}
        for (layer, target, ab), x in factors[ref_name].items():
            key, index = _layer_leaf(cfg, layer, target, ours, ab)
            y = _to_ours(x, ab, target, cfg)
            if index is None:
                staged[key] = y
            else:
                staged.setdefault(key, np.empty((cfg.n_layers,) + y.shape, np.float32))
                staged[key][index] = y
        flat.update(staged)
    abstract = abstract_params(cfg)
    leaves = []
    for p, a in jax.tree_util.tree_leaves_with_path(abstract):
        x = flat.pop(path_keys(p))
        if tuple(x.shape) != tuple(a.shape):  # a bug here: shapes were checked above
            raise AssertionError(f"{jax.tree_util.keystr(p)}: built {x.shape}, want "
                                 f"{a.shape}")
        # Leaves hf.load placed stay as they are; the replaced ones go to the host CPU.
        leaves.append(jax.device_put(x, hf._cpu_device()) if isinstance(x, np.ndarray)
                      else x)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(abstract), leaves)


def from_clara(src: str | os.PathLike, dst: str | os.PathLike, *, base=None, seed: int = 0,
               param_dtype: str | None = None, overwrite: bool = False, progress: bool = True,
               **overrides) -> dict:
    """Converts a reference CLaRa directory SRC (with its base decoder: `base`, else config's
    decoder_model_name as a local directory) into DST, the layout of `clara convert from-hf`
    (clara_jax/convert/bundle.py) plus clara_config.json. Adapters the source lacks are left
    fresh from `seed` (B = 0) and reported. `overrides`: ModelConfig fields neither checkpoint
    sets (max_len, scan_layers, remat, dtype, lora_dropout, ...). Returns a summary dict."""
    start = time.perf_counter()
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    config = read_clara_config(src)
    fixed = sorted(set(overrides) & set(FIXED))
    if fixed:
        raise hf.ConversionError(f"override(s) {fixed} come from {src / CLARA_CONFIG_FILE} and "
                                 "its adapters and cannot be changed")
    for name in (ADAPTERS_FILE, FIRST_LAST_FILE):
        if not (src / name).is_file():
            raise hf.ConversionError(f"{src / name}: no such file (a reference CLaRa directory "
                                     f"holds {CLARA_CONFIG_FILE}, {ADAPTERS_FILE} and "
                                     f"{FIRST_LAST_FILE})")
    base = _resolve_base(src, config, base)
    hf_config = hf.read_hf_config(base)
    m = config["doc_max_length"] // config["compr_rate"]
    r = config["lora_r"]
    probe = hf.model_config_from_hf(hf_config, where=str(base / hf.CONFIG_FILE),
                                    num_memory_tokens=m)
    first_last = _tensor_dict(_read(src / FIRST_LAST_FILE), src / FIRST_LAST_FILE,
                              "{name: tensor}")
    if EMBED not in first_last or (LM_HEAD not in first_last and not probe.tie_embeddings):
        need = [EMBED] + ([] if probe.tie_embeddings else [LM_HEAD])
        raise hf.ConversionError(f"{src / FIRST_LAST_FILE}: holds {sorted(first_last)}; "
                                 f"expected {need}")
    factors, targets, copies = _read_adapters(src / ADAPTERS_FILE, config, probe)

    tok, tok_dir, rows, mem_ids, ref_vocab = _reference_tokenizer_and_rows(
        src, base, config, probe, first_last, copies)

    fields = {"lora_dropout": REFERENCE_LORA_DROPOUT, **overrides, "num_memory_tokens": m,
              "latent_dim": 0, "lora_rank": r, "lora_alpha": float(2 * r),
              "lora_targets": targets, "adapters": tuple(ADAPTERS.values())}
    tmp = bundle.fresh_tmp(dst, overwrite)
    try:
        cfg, params = hf.load(base, seed=seed, param_dtype=param_dtype, progress=progress,
                              **fields)
        cfg = dataclasses.replace(cfg, vocab_size=tok.vocab_size)
        params = _with_reference_weights(cfg, params, rows, mem_ids, factors)
        bundle.write_contents(tmp, cfg, params, hf_config, tok, [tok_dir, base])
        del params
        (tmp / KEPT_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fresh = [ours for ref_name, ours in ADAPTERS.items() if ref_name not in factors]
    notes = []
    if fresh:
        notes.append(f"adapter(s) {fresh} are not in {ADAPTERS_FILE}: left fresh (B = 0, the "
                     "base decoder's output)")
    if not config.get("sep", False):
        notes.append("sep=False: the reference packs K > 1 documents' latents back to back "
                     "over the <SEP> tokens; this project keeps <SEP> between them")
    return {"src": str(src), "dst": str(dst), "base": str(base),
            "adapters": {ref: ADAPTERS[ref] for ref in factors}, "fresh_adapters": fresh,
            "num_memory_tokens": m, "compression_rate": config["compr_rate"],
            "doc_max_length": config["doc_max_length"],
            "reference_vocab_size": ref_vocab, "vocab_size": cfg.vocab_size,
            # The same M; this project's doc_max_len counts the <ENC> BOS .. EOS framing, so
            # its documents hold 3 text tokens fewer than the reference's.
            "data_config": {"data.doc_max_len": config["doc_max_length"],
                            "data.compression_rate": config["compr_rate"],
                            "data.num_docs": config.get("generation_top_k")},
            "notes": notes, "seconds": round(time.perf_counter() - start, 3),
            "model_config": bundle.model_config_to_dict(cfg)}


# ----------------------------------------------------------------------------- to-clara


def _load_tokenizer(src: Path):
    for d in (src, src / "tokenizer"):  # a from-hf / from-clara directory, an export bundle
        if (d / META_FILE).exists():
            return load_tokenizer(d), d
    raise hf.ConversionError(f"{src}: no tokenizer ({bundle.TOKENIZER_FILE} with {META_FILE}); "
                             "the reference needs the token ids of its memory tokens")


def _default_clara_config(doc_max_length: int) -> dict:
    """The fields the reference's loader reads, as its training script sets them."""
    return {"model_type": "CLaRa", "lora": True, "doc_max_length": doc_max_length,
            "different_mem_tokens": True, "sep": True, "training_stage": "stage2",
            "generation_top_k": 5, "kbtc_training": False, "quantization": "no",
            "compr_model_name": None, "training_form": "both_separately",
            "optimize_mem_tokens": True, "load_adapters": True, "pure_inference": False,
            "auto_map": {"AutoConfig": "modeling_clara.CLaRaConfig",
                         "AutoModel": "modeling_clara.CLaRa"}}


def _check_reference_layout(cfg: ModelConfig, where: Path) -> None:
    """ConversionError naming the model config field the reference's layout cannot hold."""
    if cfg.projects_latents:
        raise hf.ConversionError(f"{where}: field 'latent_dim'={cfg.latent_dim}: the reference "
                                 "has no latent projection (latents are D-wide)")
    if not cfg.lora_rank:
        raise hf.ConversionError(f"{where}: field 'lora_rank'=0: the reference's layout is "
                                 "LoRA adapters")
    if cfg.lora_alpha != 2 * cfg.lora_rank:
        raise hf.ConversionError(f"{where}: field 'lora_alpha'={cfg.lora_alpha}: the "
                                 f"reference fixes alpha = 2 * lora_r = {2 * cfg.lora_rank}")
    ours = {v: k for k, v in ADAPTERS.items()}
    missing = [a for a in ("compressor", "generator") if a not in cfg.adapters]
    if missing or any(a not in ours for a in cfg.adapters):
        raise hf.ConversionError(f"{where}: field 'adapters'={list(cfg.adapters)}: the "
                                 f"reference holds {list(ours)} (compressor and generator "
                                 "required)")


def _reference_weights(cfg: ModelConfig, get, memory, mem_ids, ref_vocab: int, np_dtype):
    """The reference's decoder_first_last_layers (embedding rows with the memory tokens'
    rows, lm_head) and its PEFT adapter state dicts, from our leaves (`get`: path -> array).
    Returns (first_last, {reference adapter name: state dict})."""

    def rows(x):  # [V, D] -> the reference's [V', D]
        return _with_rows(np.asarray(x), ref_vocab, np.float32)

    embedding = rows(get(("decoder", "embedding")))
    embedding[mem_ids] = memory  # the reference's compressor reads these rows
    first_last = {EMBED: embedding.astype(np_dtype)}
    if not cfg.tie_embeddings:
        first_last[LM_HEAD] = rows(np.asarray(get(("decoder", "unembed"))).T).astype(np_dtype)
    adapters = {}
    for ref_name in ("decoder_adapter", "encoder_adapter", "query_reasoner_adapter"):
        if ADAPTERS[ref_name] not in cfg.adapters:
            continue
        state = {}
        for i in range(cfg.n_layers):
            for module, target in MODULES.items():
                if target not in cfg.lora_targets:
                    continue
                for ab in "AB":
                    key, index = _layer_leaf(cfg, i, target, ADAPTERS[ref_name], ab)
                    x = np.asarray(get(key) if index is None else get(key)[index], np.float32)
                    state[f"model.layers.{i}.{module}.lora_{ab}.weight"] = \
                        np.ascontiguousarray(_to_peft(x, ab)).astype(np_dtype)
        adapters[ref_name] = state
    return first_last, adapters


def _write_reference_tokenizer(src: Path, raw, tok, base_tmp: Path) -> dict[str, Path]:
    """Writes the reference's tokenizer.json and tokenizer_config.json into `base_tmp` (a new
    directory); returns {file name: path} of every file the decoder directory gets besides the
    weights (those two and SRC's generation / special-token / chat-template files)."""
    base_tmp.mkdir()
    raw.save(str(base_tmp / HF_FILE))
    tok_config_file = src / bundle.HF_FILES_DIR / "tokenizer_config.json"
    tok_config = json.loads(tok_config_file.read_text()) if tok_config_file.exists() \
        else {}
    names = tok._names
    tok_config.update(bos_token=names["bos"], eos_token=names["eos"],
                      pad_token=names["pad"])
    tok_config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    tok_config.pop("added_tokens_decoder", None)  # tokenizer.json lists them all
    (base_tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    extra = {p.name: p for p in sorted(base_tmp.iterdir())}
    for name in ("generation_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (src / bundle.HF_FILES_DIR / name).exists():
            extra[name] = src / bundle.HF_FILES_DIR / name
    return extra


def to_clara(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: str = "float32",
             doc_max_length: int | None = None, overwrite: bool = False,
             progress: bool = True) -> dict:
    """Writes a converted directory SRC (from-clara, from-hf or an export bundle) in the
    reference's layout (module doc): config.json, adapters.pth, decoder_first_last_layers.pth
    and decoder/. SRC's clara_config.json, when present, is the config's template.
    doc_max_length: the reference's document length (default the template's, else 256); it
    must be a multiple of M."""

    start = time.perf_counter()
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    cfg = bundle.read_model_config(src)  # checked before the params are read
    _check_reference_layout(cfg, src / bundle.MODEL_CONFIG_FILE)
    tok, tok_dir = _load_tokenizer(src)
    cfg, params = bundle.load_params(src, cfg)
    if tok.kind != "hf":
        raise hf.ConversionError(f"{tok_dir}: a {tok.kind} tokenizer; the reference rebuilds "
                                 "its tokenizer from a Hugging Face tokenizer.json")
    template_file = src / KEPT_CONFIG_FILE
    config = (json.loads(template_file.read_text()) if template_file.exists()
              else _default_clara_config(doc_max_length or 256))
    m = cfg.num_memory_tokens
    length = int(doc_max_length or config["doc_max_length"])
    if length % m:
        raise hf.ConversionError(f"doc_max_length={length} is not a multiple of M={m} (the "
                                 "reference's M is doc_max_length // compr_rate)")
    get = hf._leaf_getter(params)
    memory = np.asarray(get(("memory_embeddings",)), np.float32)
    shared = bool(np.all(memory == memory[:1]))
    config.update(doc_max_length=length, compr_rate=length // m, lora=True,
                  lora_r=cfg.lora_rank, lora_r_compressor=cfg.lora_rank,
                  different_mem_tokens=not (shared and config.get("different_mem_tokens")
                                            is False),
                  decoder_model_name=str((dst / BASE_DIR).absolute()))
    config["training_stage"] = "stage2" if "query" in cfg.adapters else \
        config.get("training_stage", "stage1_2")


    raw, mem_ids = reference_tokenizer(RawTokenizer.from_str(tok._tok.to_str()), config)
    ref_vocab = raw.get_vocab_size(with_added_tokens=True)
    np_dtype = {"float32": np.float32, "bfloat16": np.dtype(hf._ST_DTYPES["BF16"]),
                "float16": np.float16}[dtype]

    first_last, adapters = _reference_weights(cfg, get, memory, mem_ids, ref_vocab, np_dtype)

    tmp = bundle.fresh_tmp(dst, overwrite)
    try:
        base_tmp = tmp / ".tok"
        extra = _write_reference_tokenizer(src, raw, tok, base_tmp)
        template = None
        if (src / bundle.HF_CONFIG_FILE).exists():
            template = json.loads((src / bundle.HF_CONFIG_FILE).read_text())
        hf.save(cfg, params, tmp / BASE_DIR, hf_config=template, dtype=dtype,
                progress=progress, extra_files=extra)
        shutil.rmtree(base_tmp)
        write_pth(tmp / ADAPTERS_FILE, adapters)
        write_pth(tmp / FIRST_LAST_FILE, first_last)
        (tmp / CLARA_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True)
                                             + "\n")
        replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"src": str(src), "dst": str(dst), "tokenizer": str(tok_dir),
            "adapters": {ADAPTERS[k]: k for k in adapters}, "num_memory_tokens": m,
            "doc_max_length": length, "compr_rate": length // m,
            "different_mem_tokens": config["different_mem_tokens"],
            "reference_vocab_size": ref_vocab, "vocab_size": cfg.vocab_size,
            "files": sorted(p.name for p in dst.iterdir()),
            "seconds": round(time.perf_counter() - start, 3)}
