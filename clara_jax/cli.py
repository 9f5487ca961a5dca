"""The `clara` command: `clara <command> [--flags]`.

Each command lives in `clara_jax/commands/<name>.py`, defines its absl flags at import and a
`main(argv)`; only the chosen command's module is imported, so commands never see each other's
flags. `clara <command> --help` lists a command's flags.

Every command shares three flags: `--debug` (a bad input's traceback instead of its one-line
message), `--verbose` (library INFO logs, e.g. orbax's per-save lines) and `--config`'s path
resolution (`clara_jax.commands.common.resolve_config_path`). A bad input or a fault the user
can fix ends with one line on stderr, `clara <command>: <message>`, and exit status 2.
"""

from __future__ import annotations

import errno
import importlib
import logging
import sys

from absl import app, flags
from absl import logging as absl_logging

from clara_jax import distributed
from clara_jax.commands.common import check_config_args
from clara_jax.config import ConfigError
from clara_jax.data.formats import DataError
from clara_jax.data.tokenizer import TokenizerError
from clara_jax.errors import UserError
from clara_jax.workdir import LockError

COMMANDS = {
    "ask": "Answer questions from a latent index (latent / text / closed-book RAG) as JSONL.",
    "compile": "Compile train / generate / encode ahead of time for a mesh or TPU topology "
               "and report per-chip memory, without allocating params.",
    "data": "Bundled knowledge world, TFDS dataset builds and JSONL validation.",
    "convert": "Hugging Face checkpoints in (from-hf SRC DST) and out (to-hf SRC DST); "
               "reference CLaRa models in (from-clara) and out (to-clara).",
    "eval": "Batch evaluation (EM, F1, cover-EM, Recall@k, ms per stage) of a QA file or world.",
    "export": "A self-contained serving bundle (params, tokenizer, config, index) for ask.",
    "index": "Latent indexes: build from a checkpoint and a corpus, info, search, add, delete.",
    "inspect": "Decode a document's stored latents back to text; list its nearest documents.",
    "info": "Parameter counts, shapes and memory of a config, without allocating it.",
    "train": "Train a CLaRa stage (train.stage) with checkpoints that resume exactly.",
}


# ----------------------------------------------------------------------------- user errors
# Which exceptions mean a bad input (or a fault the user can fix) and how they are reported:
# `clara <command>: <message>` on stderr, exit status 2; `--debug` shows the traceback instead.
# The messages already name the file, line and field, or the flag and its allowed values;
# these functions only keep them to one line.


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean a bad input or a fixable fault (reported in one line)."""
    # Imported when an error is classified, not with this module: these four load flax,
    # optax or orbax, which `clara --help` and a command's --help never need.
    from clara_jax.convert.hf import ConversionError
    from clara_jax.export.bundle import BundleError
    from clara_jax.index import IndexFileError, IndexMismatchError
    from clara_jax.train.checkpoint import CheckpointError

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


# ----------------------------------------------------------------------------- commands


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: clara <command> [--flags]   (clara <command> --help for its flags)", ""]
    lines += [f"  {name:<{width}}  {doc}" for name, doc in COMMANDS.items()]
    return "\n".join(lines)


def _command_help(name: str, module) -> str:
    parts = [f"usage: clara {name} [--flags]", "", (module.__doc__ or "").strip(), ""]
    by_module = flags.FLAGS.flags_by_module_dict()
    for owner, owned in by_module.items():
        if owner.startswith("clara_jax") or owner.startswith("ml_collections"):
            for flag in sorted(owned, key=lambda f: f.name):
                default = "" if flag.default is None else f" (default: {flag.default!r})"
                parts.append(f"  --{flag.name}: {flag.help}{default}")
    return "\n".join(parts)


def _forget_commands() -> None:
    """Undefines every flag a previously run command (or this module) defined, and forgets
    those modules, so that `run()` can be called again in the same process with another
    command (the tests do; two commands define flags of the same name)."""
    fl = flags.FLAGS
    owners = [o for o in fl.flags_by_module_dict() if o.startswith("clara_jax")
              or o.startswith("ml_collections")]
    names = {f.name for o in owners for f in fl.flags_by_module_dict()[o]}
    names |= {n for n in fl if n.startswith("config.")}  # ml_collections' override flags
    for name in names:
        if name in fl:
            delattr(fl, name)
    for mod in [m for m in sys.modules if m.startswith("clara_jax.commands.")]:
        del sys.modules[mod]


def _define_global_flags() -> None:
    flags.DEFINE_bool("debug", False, "Show the traceback of a bad input instead of one line.")
    flags.DEFINE_bool("verbose", False, "Show library INFO logs (orbax, absl).")


def run(argv: list[str] | None = None) -> None:
    """Runs `clara ARGV[1] ARGV[2:]`; always ends with SystemExit (status 0 on success, 2 on a
    bad input, whose one-line message is on stderr)."""
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(_usage())
        sys.exit(0 if len(argv) >= 2 else 2)
    name = argv[1]
    if name not in COMMANDS:
        print(f"clara: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        sys.exit(2)
    # JAX logs each accelerator backend it fails to find; on a CPU host that is only noise.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)

    debug = "--debug" in argv[2:]
    try:
        rest = check_config_args(argv[2:])
    except Exception as e:
        if not is_user_error(e):
            raise
        report(f"clara {name}", e, debug)
    _forget_commands()
    flags.FLAGS.unparse_flags()  # a value from an earlier in-process run must not carry over
    module = importlib.import_module(f"clara_jax.commands.{name}")
    try:
        _run_command(name, module, rest)
    finally:
        # An in-process caller (a test, a notebook) may import a command module next; the
        # flags this run defined must not collide with that module's.
        _forget_commands()


def _run_command(name: str, module, rest: list[str]) -> None:
    distributed.define_flags()
    _define_global_flags()
    if any(a in ("-h", "--help", "--helpshort") for a in rest):
        # absl's --help lists the flags of the script's main module only, and ours live in
        # the command modules.
        print(_command_help(name, module))
        sys.exit(0)

    def main(command_argv):
        set_quiet(not flags.FLAGS.verbose)
        try:
            distributed.initialize()
            return module.main(command_argv)
        except Exception as e:
            if not is_user_error(e):
                raise
            report(f"clara {name}", e, flags.FLAGS.debug)

    # ml_collections finds the --config.FIELD overrides in sys.argv, not in the argv parsed.
    command_argv, saved = [f"clara {name}"] + rest, sys.argv
    sys.argv = command_argv
    try:
        app.run(main, argv=command_argv, flags_parser=parse_flags)
    finally:
        sys.argv = saved


if __name__ == "__main__":
    run()
