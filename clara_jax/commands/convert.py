"""`clara convert from-hf SRC DST` and `clara convert to-hf SRC DST`.

from-hf: a Hugging Face Llama / Mistral / Qwen2 directory (config.json + safetensors, single or
sharded) -> DST with orbax params, model_config.json and the tokenizer with the CLaRa special
tokens (layout: clara_jax/convert/bundle.py). The fields a checkpoint does not have (M, latent
width, LoRA, layer scan) come from `--config=configs/...py` (whose model shapes must then equal
the checkpoint's) and/or `--set field=value`; from-clara takes from them only what the
reference checkpoint does not fix (layer scan, remat, dtype, max_len, LoRA dropout).

to-hf: such a DST back to a Hugging Face directory (the base decoder; adapters are not part of
it).

from-clara: a model saved by the reference implementation (apple/ml-clara: config.json,
adapters.pth, decoder_first_last_layers.pth) with its base decoder (`--base`, else config.json's
decoder_model_name as a local directory) -> DST as from-hf writes it, adapters and memory tokens
included (clara_jax/convert/clara.py). to-clara: such a DST back to the reference's layout,
with the base decoder in DST/decoder. Each prints one JSON summary line.

    clara convert from-hf ~/Mistral-7B-Instruct-v0.2 runs/mistral \\
        --config=configs/mistral_7b.py:compression=16 --param_dtype=bfloat16
    clara convert to-hf runs/mistral runs/mistral_hf --dtype=bfloat16
    clara convert from-clara ~/CLaRa-7B-E2E/compression-16 runs/clara7b \\
        --base=~/Mistral-7B-Instruct-v0.2 --param_dtype=bfloat16
    clara convert to-clara runs/clara7b runs/clara7b_ref --dtype=bfloat16
"""

from __future__ import annotations

import ast
import json
import re

from absl import flags, logging

from clara_jax.commands.common import define_config_flag, define_output_flags
from clara_jax.config import finalize
from clara_jax.convert import bundle, clara, hf
from clara_jax.convert.pth import PthError
from clara_jax.data.tokenizer import TokenizerError
from clara_jax.model import ModelConfig

define_config_flag()
flags.DEFINE_multi_string("set", [], "ModelConfig override field=value for from-hf, e.g. "
                          "--set num_memory_tokens=8 --set scan_layers=True (repeatable).")
flags.DEFINE_integer("seed", 0, "from-hf, from-clara: RNG seed of the parts the source lacks "
                     "(adapters, memory embeddings, latent projections).")
flags.DEFINE_enum("param_dtype", None, ["float32", "bfloat16"],
                  "from-hf, from-clara: dtype of the stored base decoder weights (default: "
                  "--config's model.base_dtype, else float32).")
flags.DEFINE_bool("tokenizer", True, "from-hf: convert SRC/tokenizer.json too (required "
                  "unless --notokenizer).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"],
                  "to-hf, to-clara: dtype of the written weights.")
flags.DEFINE_string("max_shard_size", "5GB", "to-hf: largest shard, e.g. 5GB, 500MB, 40KB or "
                    "a byte count.")
flags.DEFINE_string("base", None, "from-clara: the base decoder's Hugging Face directory "
                    "(default: the source config's decoder_model_name, if a local directory).")
flags.DEFINE_integer("doc_max_length", None, "to-clara: the reference's doc_max_length (a "
                     "multiple of M; default the source's clara_config.json, else 256).")
define_output_flags(overwrite="Replace a non-empty DST.", progress="Show progress bars.")

FLAGS = flags.FLAGS
DIRECTIONS = ("from-hf", "to-hf", "from-clara", "to-clara")
USAGE = f"usage: clara convert {{{'|'.join(DIRECTIONS)}}} SRC DST [--flags]"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000 (decimal units as transformers; KiB/MiB/GiB binary)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise flags.IllegalFlagValueError(f"--max_shard_size={text!r}: expected a size like "
                                          "5GB, 500MB or 40000")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def parse_overrides(items: list[str]) -> dict:
    """['num_memory_tokens=8', 'scan_layers=True'] -> {'num_memory_tokens': 8, ...}."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in hf.OVERRIDABLE:
            raise flags.IllegalFlagValueError(
                f"--set {item!r}: expected field=value with field one of {list(hf.OVERRIDABLE)}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value  # a bare string such as remat=dots
    return out


def overrides_from_config(config) -> tuple[dict, ModelConfig]:
    """The fields the checkpoint lacks, from a finalized experiment config."""
    exp = ModelConfig.from_config(finalize(config))
    return {k: getattr(exp, k) for k in hf.OVERRIDABLE}, exp


def main(argv) -> None:
    args = argv[1:]
    if len(args) != 3 or args[0] not in DIRECTIONS:
        raise SystemExit(f"{USAGE}\n(got {args})")
    direction, src, dst = args
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file it closes at INFO

    try:
        summary = _run(direction, src, dst)
    except (hf.ConversionError, PthError, TokenizerError, flags.IllegalFlagValueError) as e:
        raise SystemExit(f"clara convert {direction}: {e}") from None
    print(json.dumps(summary))


def _run(direction: str, src: str, dst: str) -> dict:
    if direction == "from-hf":
        overrides, exp = {}, None
        if FLAGS.config is not None:
            overrides, exp = overrides_from_config(FLAGS.config)
        overrides.update(parse_overrides(FLAGS.set))
        if exp is not None:
            hf.check_shapes_match(hf.model_config_from_hf(hf.read_hf_config(src), **overrides), exp)
        summary = bundle.from_hf(src, dst, tokenizer=FLAGS.tokenizer, seed=FLAGS.seed,
                                 param_dtype=FLAGS.param_dtype, overwrite=FLAGS.overwrite,
                                 progress=FLAGS.progress, **overrides)
        if exp is not None and exp.vocab_size != summary["vocab_size"]:
            summary["note"] = (f"the converted vocabulary has {summary['vocab_size']} ids; train "
                               f"with --config.model.vocab_size={summary['vocab_size']}")
    elif direction == "from-clara":
        overrides = {}
        if FLAGS.config is not None:  # its run settings; the shapes come from the checkpoint
            overrides, _ = overrides_from_config(FLAGS.config)
            overrides = {k: v for k, v in overrides.items() if k not in clara.FIXED}
        overrides.update(parse_overrides(FLAGS.set))
        summary = clara.from_clara(src, dst, base=FLAGS.base, seed=FLAGS.seed,
                                   param_dtype=FLAGS.param_dtype, overwrite=FLAGS.overwrite,
                                   progress=FLAGS.progress, **overrides)
    elif direction == "to-clara":
        summary = clara.to_clara(src, dst, dtype=FLAGS.dtype,
                                 doc_max_length=FLAGS.doc_max_length,
                                 overwrite=FLAGS.overwrite, progress=FLAGS.progress)
    else:
        summary = bundle.to_hf(src, dst, dtype=FLAGS.dtype,
                               max_shard_bytes=parse_size(FLAGS.max_shard_size),
                               overwrite=FLAGS.overwrite, progress=FLAGS.progress)
    return summary
