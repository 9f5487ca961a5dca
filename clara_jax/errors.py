"""One line per user error: which exceptions mean a bad input (or a fault the user can fix),
how they are reported, and the checks of `--config` made before any flag is parsed.

`clara_jax.cli` reports every error listed by `user_errors()` as `clara <command>: <message>`
on stderr with exit status 2; `--debug` shows the traceback instead. The messages already name
the file, line and field, or the flag and its allowed values; this module only keeps them to
one line.
"""

from __future__ import annotations

import difflib
import errno
import importlib.util
import logging
import os
import sys
from pathlib import Path

from absl import flags


class UserError(ValueError):
    """A bad input found by the command-line layer; the message names the flag or file."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean a bad input or a fixable fault (reported in one line)."""
    from clara_jax.config import ConfigError
    from clara_jax.convert.hf import ConversionError
    from clara_jax.data.formats import DataError
    from clara_jax.data.tokenizer import TokenizerError
    from clara_jax.export.bundle import BundleError
    from clara_jax.index import IndexFileError, IndexMismatchError
    from clara_jax.train.checkpoint import CheckpointError
    from clara_jax.workdir import LockError

    return (UserError, ConfigError, ConversionError, DataError, TokenizerError, BundleError,
            IndexFileError, IndexMismatchError, CheckpointError, LockError, flags.Error,
            FileExistsError, FileNotFoundError, IsADirectoryError, NotADirectoryError,
            PermissionError, RecursionError)


def one_line(e: BaseException) -> str:
    """The message of `e` on one line (a KeyError's message is its first argument)."""
    if isinstance(e, RecursionError):
        return "input nested too deeply to read (a JSON value nested thousands of levels)"
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return f"{e.filename or 'disk'}: no space left on device (free space and rerun)"
    if isinstance(e, OSError) and e.strerror and e.filename:
        return f"{e.filename}: {e.strerror}"
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return "; ".join(part.strip() for part in text.splitlines() if part.strip()) or repr(e)


def report(prefix: str, e: BaseException, debug: bool) -> None:
    """Prints `prefix: message` to stderr and exits 2; re-raises when `debug`."""
    if debug:
        raise e
    print(f"{prefix}: {one_line(e)}", file=sys.stderr, flush=True)
    sys.exit(2)


def is_user_error(e: BaseException) -> bool:
    """Whether `e` is reported in one line: a listed error, or a full disk (any OSError)."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return True
    return isinstance(e, user_errors())


def set_quiet(quiet: bool) -> None:
    """Library INFO logs (orbax logs every save, restore and directory it opens; absl's
    verbosity is raised to INFO by app.run) shown only when not `quiet`."""
    from absl import logging as absl_logging

    level = logging.WARNING if quiet else logging.INFO
    absl_logging.set_verbosity(absl_logging.WARNING if quiet else absl_logging.INFO)
    for name in ("absl", "orbax", "jax._src.xla_bridge"):
        logging.getLogger(name).setLevel(level)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing with its errors in one line (exit status 2, not absl's 1)."""
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # a config file's own finalize() runs while its flag is parsed
        if not is_user_error(e):
            raise
        report(argv[0] if argv else "clara", e, "--debug" in argv)
        raise  # report exits


# ----------------------------------------------------------------------------- --config


def package_root() -> Path:
    """The directory holding the `clara_jax` package (and, in a checkout or an editable
    install, `configs/`)."""
    return Path(__file__).resolve().parents[1]


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
