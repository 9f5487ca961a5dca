"""`clara export --checkpoint=DIR --index=IDX --out=BUNDLE`: a self-contained serving bundle
(clara_jax.export.bundle): params (orbax; the base decoder also as Hugging Face safetensors;
adapters, memory embeddings and latent projections as one safetensors file), tokenizer, model
and experiment config, a copy of the index, and bundle.json (identity, creation time,
versions). `clara ask --bundle=BUNDLE "question"` answers from it with no training workdir.
Prints bundle.json's contents (one JSON line). Exit status 2 on bad input.
"""

from __future__ import annotations

import json
import sys

from absl import flags

from clara_jax.commands.rag_common import check_args, error_line, load_errors
from clara_jax.workdir import lock_output

flags.DEFINE_string("checkpoint", None, "Training run (WORKDIR or WORKDIR/checkpoints); the "
                    "latest step is exported.")
flags.DEFINE_string("index", None, "Latent index built by this checkpoint (copied into the "
                    "bundle); omit for a closed-book-only bundle.")
flags.DEFINE_string("out", None, "The bundle directory to write.")
flags.DEFINE_string("tokenizer", None, "Tokenizer directory (default: the run's "
                    "train.data_dir/tokenizer).")
flags.DEFINE_enum("decoder_dtype", "float32", ["float32", "bfloat16", "float16"],
                  "dtype of the Hugging Face decoder safetensors.")
flags.DEFINE_bool("overwrite", False, "Replace an existing non-empty --out.")
flags.DEFINE_bool("progress", True, "Show a progress bar while writing tensors.")


def main(argv) -> None:
    from clara_jax.convert.hf import ConversionError
    from clara_jax.export.bundle import export_bundle

    fl = flags.FLAGS
    try:
        check_args(argv, ("checkpoint", "out"))
        with lock_output(fl.out, "clara export"):
            meta = export_bundle(fl.checkpoint, fl.out, index=fl.index,
                                 tokenizer=fl.tokenizer, overwrite=fl.overwrite,
                                 decoder_dtype=fl.decoder_dtype, progress=fl.progress)
    except (ConversionError, FileExistsError, *load_errors()) as e:
        print(f"clara export: {error_line(e)}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(meta))
