"""Flags and helpers shared by commands (most of them for the commands that take an experiment
config), and the checks of `--config` that `clara_jax.cli` makes before any flag is parsed."""

from __future__ import annotations

import difflib
import importlib.util
import os
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from clara_jax.config import finalize
from clara_jax.errors import UserError


def define_config_flag() -> None:
    config_flags.DEFINE_config_file(
        "config", None,
        "Experiment config file, e.g. configs/demo.py or configs/mistral_7b.py:compression=128; "
        "override fields with --config.train.steps=50.",
        lock_config=False)


def define_output_flags(overwrite: str, progress: str) -> None:
    """--overwrite (default off) and --progress (default on), with the command's own help for
    each: what is replaced, and which bars are shown."""
    flags.DEFINE_bool("overwrite", False, overwrite)
    flags.DEFINE_bool("progress", True, progress)


def define_positive_integer(name: str, default: int | None, help: str) -> None:
    """An integer flag that absl refuses at parse time unless it is unset or >= 1 (`clara X:
    flag --NAME=0: must be a positive integer`, exit status 2)."""
    flags.DEFINE_integer(name, default, help)
    flags.register_validator(name, lambda v: v is None or v > 0,
                             message="must be a positive integer")


def define_model_flags(checkpoint: str) -> None:
    """--checkpoint (with the command's own help) and --tokenizer: the trained model a command
    loads through `clara_jax.infer.serving.load_checkpoint_model`."""
    flags.DEFINE_string("checkpoint", None, checkpoint)
    flags.DEFINE_string("tokenizer", None, "Tokenizer directory (default: the run's own copy, "
                        "else its train.data_dir/tokenizer; a converted model's own).")


def load_config():
    """The --config flag's ConfigDict, validated again after command-line overrides (which may
    change fields that derived ones depend on)."""
    config = flags.FLAGS.config
    if config is None:
        raise flags.IllegalFlagValueError("--config is required, e.g. --config=configs/demo.py")
    return finalize(config)


# ----------------------------------------------------------------------------- --config


def package_root() -> Path:
    """The directory holding the `clara_jax` package (and, in a checkout or an editable
    install, `configs/`)."""
    return Path(__file__).resolve().parents[2]


def resolve_config_path(spec: str) -> str:
    """`FILE[:ARG]` with FILE found from the working directory, else from the installed
    package's directory (so `--config=configs/tiny.py` works from anywhere), else as a bare
    name in its `configs/`. Raises UserError naming where it looked."""
    file, sep, arg = spec.partition(":")
    tried = [Path(file), package_root() / file, package_root() / "configs" / file]
    for path in tried:
        if path.is_file():
            return str(path.absolute()) + sep + arg
    raise UserError(f"--config={spec}: no such file (looked in {os.getcwd()} and "
                    f"{package_root()}; give a path such as configs/tiny.py)")


def _leaves(node, prefix="") -> list[str]:
    out = []
    for key in node.keys():
        value = node[key]
        if hasattr(value, "keys"):
            out += _leaves(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}")
    return out


def _similar(name: str, candidates: list[str], n: int = 3) -> list[str]:
    """Nearest field names: by spelling, by initials (`lr` -> `learning_rate`) and by
    containing the name's letters in order."""
    def initials(c):
        return "".join(p[0] for p in c.split("_") if p)

    def subsequence(short, long):
        it = iter(long)
        return all(ch in it for ch in short)

    scored = []
    for c in candidates:
        leaf, want = c.rsplit(".", 1)[-1], name.rsplit(".", 1)[-1]
        score = difflib.SequenceMatcher(None, want, leaf).ratio()
        if initials(leaf) == want:
            score = max(score, 0.9 + 0.05 * score)
        elif len(want) >= 2 and subsequence(want, leaf):
            score = max(score, 0.6)
        if score >= 0.5:
            scored.append((-score, c))
    return [c for _, c in sorted(scored)[:n]]


def check_config_overrides(config, keys: list[str]) -> None:
    """UserError for an override `--config.a.b=...` whose field does not exist, suggesting the
    nearest existing names."""
    fields = _leaves(config)
    for key in keys:
        node, walked = config, []
        for part in key.split("."):
            if not hasattr(node, "keys") or part not in node:
                parent = ".".join(walked)
                here = [f for f in fields if f.startswith(parent + ".")] if parent else fields
                near = _similar(key, here) or _similar(key, fields)
                hint = f"; did you mean {', '.join('--config.' + n for n in near)}?" if near \
                    else ""
                raise UserError(f"--config.{key}: no such config field "
                                f"({'config.' + parent if parent else 'config'} has no "
                                f"{part!r}){hint}")
            node = node[part]
            walked.append(part)


def _load_config_module(path: str):
    file, _, arg = path.partition(":")
    spec = importlib.util.spec_from_file_location("clara_config_check", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def check_config_args(args: list[str]) -> list[str]:
    """Before absl parses anything: resolves `--config`'s path and checks that every
    `--config.FIELD` override names an existing field. Returns `args` with the resolved
    path."""
    out, path, keys = [], None, []
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--config="):
            path = resolve_config_path(a.split("=", 1)[1])
            a = f"--config={path}"
        elif a == "--config" and i + 1 < len(args):
            path = resolve_config_path(args[i + 1])
            out += [a, path]
            i += 2
            continue
        elif a.startswith("--config."):
            keys.append(a[len("--config."):].split("=", 1)[0])
        out.append(a)
        i += 1
    if keys and path is not None:
        check_config_overrides(_load_config_module(path), keys)
    return out
