"""`clara data world|build|check`: the bundled world, TFDS builds and file validation.

  clara data world --out DIR [--seed S] [--size small|medium|medium/small] [--config C [--build]]
                   [--progress=false]
      writes DIR/{train,heldout}/{corpus,stage1,stage2,stage3}.jsonl; with --config also the
      world's tokenizer in DIR/tokenizer, and with --build all four TFDS datasets in DIR.
  clara data build --format stage1|stage2|stage3|corpus --input FILE|split=FILE,... --out DIR
                   --config C [--tokenizer TDIR] [--skip_bad_rows] [--progress=false]
      builds DIR/clara_<format> (array_record) and prints the build summary as one JSON line.
  clara data check --format F FILE [--tokenizer TDIR] [--config C] [--skip_bad_rows]
      validates FILE and prints one JSON line (rows, bad_rows, tokens_per_doc percentiles);
      exits 1 on a bad row unless --skip_bad_rows.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from absl import flags

from clara_jax.commands.common import define_config_flag, define_output_flags
from clara_jax.config import ConfigError, finalize
from clara_jax.data import formats, world
from clara_jax.data.tokenizer import TokenizerError, load_or_import_tokenizer, load_tokenizer
from clara_jax.data.world import WORLD_SIZES
from clara_jax.workdir import lock

define_config_flag()
flags.DEFINE_string("out", None, "Output directory (world, build).")
flags.DEFINE_integer("seed", 0, "World seed (world).")
flags.DEFINE_enum("size", "small", list(WORLD_SIZES),
                  "World size (world): both worlds', or TRAIN/HELDOUT such as medium/small.")
flags.DEFINE_bool("build", False, "world: also build all four TFDS datasets (needs --config).")
flags.DEFINE_enum("format", None, ["stage1", "stage2", "stage3", "corpus"],
                  "Input format (build, check).")
flags.DEFINE_string("input", None, "build: a JSONL file (the 'train' split) or "
                    "'split=FILE,split=FILE'.")
flags.DEFINE_string("tokenizer", None, "A saved clara tokenizer directory, or a Hugging Face "
                    "tokenizer.json (or its directory) for build (build, check).")
flags.DEFINE_bool("skip_bad_rows", False, "Skip and count bad rows instead of failing.")
define_output_flags(overwrite="world: write into a non-empty --out, removing the datasets and "
                             "tokenizer built from its previous world.",
                    progress="Show TFDS's progress bars while building (world, build).")
flags.DEFINE_bool("replace_tokenizer", False, "build: use --tokenizer although --out holds "
                  "another tokenizer (its other datasets must then be rebuilt).")

FLAGS = flags.FLAGS
USAGE = "usage: clara data world|build|check [--flags]   (clara data --helpfull lists them)"


def _config(required: bool):
    if FLAGS.config is None:
        if required:
            raise flags.IllegalFlagValueError("--config is required, e.g. --config=configs/demo.py")
        return None
    return finalize(FLAGS.config)


def _require(name: str):
    value = getattr(FLAGS, name)
    if value is None:
        raise flags.IllegalFlagValueError(f"--{name} is required")
    return value


def parse_inputs(spec: str) -> dict[str, str]:
    """'FILE' -> {'train': FILE}; 'a=F1,b=F2' -> {'a': F1, 'b': F2}."""
    if "=" not in spec:
        return {"train": spec}
    out = {}
    for part in spec.split(","):
        split, sep, path = part.partition("=")
        if not sep or not split or not path:
            raise flags.IllegalFlagValueError(f"--input: cannot parse {part!r} (want split=FILE)")
        if split.strip() in out:  # a dict would keep only the last file
            raise flags.IllegalFlagValueError(
                f"--input: split {split.strip()!r} given twice ({out[split.strip()]} and "
                f"{path.strip()}); give each split once")
        out[split.strip()] = path.strip()
    return out


# What a world's --out holds besides its JSONL files: built from the previous world, so
# --overwrite removes them rather than leaving them beside the new one.
_WORLD_DERIVED = ("clara_*", "tokenizer", "prepare.json")


def _clear_world_out(out, dry_run: bool = False) -> None:
    out = Path(out)
    if not out.is_dir() or not any(p for p in out.iterdir() if p.name != ".clara.lock"):
        return
    if not FLAGS.overwrite:
        raise flags.IllegalFlagValueError(f"--out={out}: exists and is not empty (pass "
                                          "--overwrite to replace the world in it)")
    if dry_run:
        return
    for pattern in _WORLD_DERIVED:
        for p in out.glob(pattern):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def _world() -> int:
    out = _require("out")
    config = _config(required=FLAGS.build)
    _clear_world_out(out, dry_run=True)  # refused before the lock creates --out
    with lock(out, "clara data world"):
        _clear_world_out(out)
        summary = _write_world(out, config)
    print(json.dumps(summary))
    return 0


def _write_world(out, config) -> dict:
    from clara_jax.data import prepare

    if FLAGS.build:
        summary = prepare.prepare_world(out, config, FLAGS.seed, FLAGS.size,
                                        progress=FLAGS.progress)
    else:
        summary = {"world": world.write_world(out, FLAGS.seed, FLAGS.size)}
        if config is not None:
            tok = prepare.world_tokenizer(config, FLAGS.seed, FLAGS.size)
            tok.save(f"{out}/tokenizer")
            summary["tokenizer"] = {"kind": tok.kind, "vocab_size": tok.vocab_size}
    return summary


def _build() -> int:
    from clara_jax.data import tfds_build

    config = _config(required=True)
    fmt, inputs, out = _require("format"), parse_inputs(_require("input")), _require("out")
    tok = (load_or_import_tokenizer(FLAGS.tokenizer, config.model.num_memory_tokens)
           if FLAGS.tokenizer else None)
    try:
        summary = tfds_build.build_dataset(fmt, inputs, out, config, tok, FLAGS.skip_bad_rows,
                                           FLAGS.progress,
                                           replace_tokenizer=FLAGS.replace_tokenizer)
    except formats.DataError as e:
        print(f"clara data build: {e}", file=sys.stderr)
        return 1
    for line in tfds_build.truncation_warnings(summary):
        print(f"warning: {line}", file=sys.stderr)
    print(json.dumps(summary))
    return 0


def _check(argv: list[str]) -> int:
    from clara_jax.data import tfds_build

    if len(argv) != 1:
        raise flags.IllegalFlagValueError("check takes exactly one FILE")
    path, fmt = argv[0], _require("format")
    config = _config(required=False)
    tok = load_tokenizer(FLAGS.tokenizer) if FLAGS.tokenizer else None
    # Read everything (bad rows counted) so one run reports every bad line.
    try:
        rows, stats = formats.read_jsonl(path, fmt, skip_bad_rows=True)
    except formats.DataError as e:  # the file itself is missing
        print(f"clara data check: {e}", file=sys.stderr)
        return 1
    summary = {"file": path, "format": fmt, "rows": stats.rows, "bad_rows": stats.bad_rows,
               **tfds_build.token_stats(fmt, rows, tok, config if tok else None),
               "errors": stats.errors[:5]}
    print(json.dumps(summary))
    for err in stats.errors:
        print(err, file=sys.stderr)
    return 1 if stats.bad_rows and not FLAGS.skip_bad_rows else 0


def main(argv) -> None:
    args = list(argv[1:])
    if not args or args[0] not in ("world", "build", "check"):
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    sub, rest = args[0], args[1:]
    try:
        if sub != "check" and rest:
            raise flags.IllegalFlagValueError(f"unexpected arguments {rest}")
        code = _world() if sub == "world" else _build() if sub == "build" else _check(rest)
    except (flags.IllegalFlagValueError, TokenizerError, ConfigError) as e:
        print(f"clara data {sub}: {e}", file=sys.stderr)
        code = 2
    sys.exit(code)
