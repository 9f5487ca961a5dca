"""`clara export --checkpoint=DIR --index=IDX --out=BUNDLE`: a self-contained serving bundle
(clara_jax.export.bundle): params (orbax; the base decoder also as Hugging Face safetensors;
adapters, memory embeddings and latent projections as one safetensors file), tokenizer, model
and experiment config, a copy of the index, and bundle.json (identity, creation time,
versions). `clara ask --bundle=BUNDLE "question"` answers from it with no training workdir.
Prints bundle.json's contents (one JSON line). Exit status 2 on bad input.
"""

from __future__ import annotations

import json

from absl import flags

from clara_jax.commands.common import define_model_flags, define_output_flags
from clara_jax.commands.rag_common import check_args, exit_on_bad_input
from clara_jax.workdir import lock_output

define_model_flags("Training run (WORKDIR or WORKDIR/checkpoints); the latest step is "
                   "exported.")
flags.DEFINE_string("index", None, "Latent index built by this checkpoint (copied into the "
                    "bundle); omit for a closed-book-only bundle.")
flags.DEFINE_string("out", None, "The bundle directory to write.")
flags.DEFINE_enum("decoder_dtype", "float32", ["float32", "bfloat16", "float16"],
                  "dtype of the Hugging Face decoder safetensors.")
define_output_flags(overwrite="Replace an existing non-empty --out.",
                    progress="Show a progress bar while writing tensors.")


def main(argv) -> None:
    from clara_jax.convert.hf import ConversionError
    from clara_jax.export.bundle import export_bundle

    fl = flags.FLAGS
    with exit_on_bad_input("export", ConversionError, FileExistsError):
        check_args(argv, ("checkpoint", "out"))
        with lock_output(fl.out, "clara export"):
            meta = export_bundle(fl.checkpoint, fl.out, index=fl.index,
                                 tokenizer=fl.tokenizer, overwrite=fl.overwrite,
                                 decoder_dtype=fl.decoder_dtype, progress=fl.progress)
    print(json.dumps(meta))
