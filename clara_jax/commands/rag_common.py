"""Flags and set-up shared by `clara ask`, `clara inspect` and `clara eval`: the checkpoint (a
training run or a converted model) or bundle, its tokenizer, the latent index (opened with the
model's identity), the serving mesh and the sampling settings; the loading itself is
`clara_jax.infer.serving`."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from absl import flags

from clara_jax.commands.common import define_model_flags, define_positive_integer
from clara_jax.data.tokenizer import TokenizerError


class InputError(ValueError):
    """Bad command-line input; the message names the flag, file, line or field."""


def check_args(argv, required: tuple[str, ...]) -> None:
    """InputError for stray positional arguments or a missing required flag."""
    if len(argv) > 1:
        raise InputError(f"unexpected arguments: {' '.join(argv[1:])}")
    for name in required:
        if not getattr(flags.FLAGS, name):
            raise InputError(f"--{name} is required")


def check_out(path, overwrite: bool, directory: bool, outputs=()) -> None:
    """InputError before any work when --out would overwrite something: an existing file
    (or, for a `directory`, one holding any of `outputs`) needs --overwrite, and a file is
    never replaced by a directory nor a directory by a file."""
    if not path:
        return
    p = Path(path)
    if directory and p.exists() and not p.is_dir():
        raise InputError(f"--out={p}: exists and is a file (--out names a directory)")
    if not directory and p.is_dir():
        raise InputError(f"--out={p}: is a directory (--out names a file)")
    taken = [p] if (not directory and p.exists()) else [p / o for o in outputs
                                                          if (p / o).exists()]
    if taken and not overwrite:
        raise InputError(f"--out={p}: {taken[0]} exists (pass --overwrite to replace it)")


def load_errors() -> tuple[type[Exception], ...]:
    """Exceptions that mean bad input (reported in one line, exit status 2)."""
    from clara_jax.index import IndexFileError, IndexMismatchError
    from clara_jax.train.checkpoint import CheckpointError

    return (InputError, CheckpointError, TokenizerError, IndexFileError, IndexMismatchError,
            ValueError, KeyError)


def error_line(e: Exception) -> str:
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


@contextlib.contextmanager
def exit_on_bad_input(command: str, *extra: type[Exception]):
    """Ends `clara <command>` with its one-line message on stderr and exit status 2 when the
    block raises one of `load_errors()` or `extra`."""
    try:
        yield
    except (*extra, *load_errors()) as e:
        print(f"clara {command}: {error_line(e)}", file=sys.stderr)
        sys.exit(2)


def define_pipeline_flags() -> None:
    """Defines the shared flags (call once, at the importing command's import)."""
    define_model_flags("A training run's workdir or its checkpoints dir, or a converted "
                       "model (`clara convert from-clara` / `from-hf` DST).")
    flags.DEFINE_string("bundle", None, "A serving bundle (`clara export`) instead of "
                        "--checkpoint; its own index unless --index is given.")
    flags.DEFINE_string("index", None, "Latent index directory (`clara index build`).")
    flags.DEFINE_float("temperature", 0.0, "0: greedy decoding.")
    flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: off).")
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1: off).")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_enum("backend", "auto", ["auto", "scann", "exact"], "Index search backend.")
    define_positive_integer("batch_size", 32, "Rows per generation batch.")
    flags.DEFINE_string("mesh", None, "Device mesh to serve on, e.g. fsdp=2,tensor=4: the "
                        "params are split by the sharding rules and each batch over data x "
                        "fsdp (axes not named keep the checkpoint's config.mesh; default: "
                        "config.mesh over this host's devices).")


def define_answer_flags() -> None:
    """--mode, --num_docs and --max_new_tokens of the commands that answer questions."""
    flags.DEFINE_enum("mode", "latent", ["latent", "text", "closed_book"],
                      "latent: documents as latents (CLaRa); text: their text in the prompt; "
                      "closed_book: no documents.")
    define_positive_integer("num_docs", None,
                            "K documents per question (default config.data.num_docs).")
    define_positive_integer("max_new_tokens", None,
                            "Answer length cap (default config.data.answer_max_len).")


def mesh_override(fl):
    """--mesh as {axis: size} (None when not given), for `clara_jax.infer.serving`."""
    from clara_jax.aot import parse_mesh

    return parse_mesh(fl.mesh) or None


def build_pipeline(fl, need_index: bool, settings: dict | None = None,
                   no_index_hint: str = " (or use --mode=closed_book)"):
    """A RagPipeline (`clara_jax.infer.serving.load_pipeline`) from the common flags
    (checkpoint or bundle, tokenizer, index, mesh, sampling, backend, batch size); `settings`
    gives the rest of its RagSettings (num_docs and max_new_tokens default to the config's).
    InputError before loading anything when the flags cannot work."""
    from clara_jax.infer.generation import Sampling
    from clara_jax.infer.serving import load_pipeline

    if bool(fl.checkpoint) == bool(fl.bundle):
        raise InputError("give --checkpoint (a training run) or --bundle (`clara export`)")
    if need_index and fl.checkpoint and not fl.index:
        raise InputError(f"--index is required{no_index_hint}")
    pipeline = load_pipeline(
        checkpoint=fl.checkpoint or None, index=fl.index or None, bundle=fl.bundle or None,
        tokenizer=fl.tokenizer, mesh=mesh_override(fl),
        sampling=Sampling(fl.temperature, fl.top_k, fl.top_p), backend=fl.backend,
        batch_size=fl.batch_size, **(settings or {}))
    if need_index and pipeline.index is None:  # a bundle exported without one
        raise InputError(f"--index is required{no_index_hint}")
    return pipeline
