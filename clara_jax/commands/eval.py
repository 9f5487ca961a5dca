"""`clara eval --checkpoint=DIR --index=IDX --data=FILE --mode=latent|text|closed_book
--out=OUT`: batch offline evaluation (clara_jax.eval.job) of a stage-2 / stage-3 JSONL file or
a world directory (`clara data world --out DIR`: DIR/<split>/stage3.jsonl). --checkpoint is a
training run or a converted model (`clara convert from-clara` / `from-hf` DST, evaluated with
no training step); `--bundle=BUNDLE` replaces --checkpoint and --index.

Scores EM, F1, cover-EM (SQuAD normalisation) and Recall@1/3/5 of the gold documents
(pos_index, mapped to index ids through --corpus, default the corpus.jsonl beside the data
file), with milliseconds per stage. Writes OUT/predictions.jsonl, OUT/summary.json and
OUT/summary.md (from process 0; every process evaluates its strided slice). Prints the
summary JSON as the last line. Exit status 2 on bad input, with the file, line and field.
"""

from __future__ import annotations

import json

from absl import flags

from clara_jax.commands import rag_common
from clara_jax.commands.common import define_output_flags, define_positive_integer
from clara_jax.data.formats import DataError

rag_common.define_pipeline_flags()
rag_common.define_answer_flags()
flags.DEFINE_string("data", None, "Stage-2/3 JSONL file, or a world directory.")
flags.DEFINE_enum("format", "stage3", ["stage2", "stage3"], "Format of --data.")
flags.DEFINE_string("split", "heldout", "World split when --data is a directory.")
flags.DEFINE_string("corpus", None, "Corpus JSONL the index was built from, to map gold "
                    "documents to index ids (default: corpus.jsonl beside the data file; "
                    "none: the index's stored text).")
flags.DEFINE_string("out", None, "Output directory.")
define_positive_integer("limit", None, "Evaluate N rows spread evenly over the file.")
flags.DEFINE_bool("warmup", True, "Run the first batch once untimed (compilation).")
flags.DEFINE_bool("skip_bad_rows", False, "Skip rows that fail validation.")
define_output_flags(overwrite="Replace the outputs of an earlier evaluation in --out.",
                    progress="Show a progress bar.")


def main(argv) -> None:
    from clara_jax.eval.job import evaluate, load_items, resolve_data

    fl = flags.FLAGS
    with rag_common.exit_on_bad_input("eval", DataError):
        rag_common.check_args(argv, ("data", "out"))
        if bool(fl.checkpoint) == bool(fl.bundle):
            raise rag_common.InputError("give --checkpoint (with --index) or --bundle")
        if fl.checkpoint and fl.mode != "closed_book" and not fl.index:
            raise rag_common.InputError("--index is required (or use --mode=closed_book)")
        rag_common.check_out(fl.out, fl.overwrite, directory=True,
                             outputs=("predictions.jsonl", "summary.json", "summary.md"))
        data_file, _ = resolve_data(fl.data, fl.split, fl.format)
        if not data_file.is_file():  # before loading the model
            raise rag_common.InputError(f"--data: {data_file}: no such file")
        settings = {name: getattr(fl, name) for name in ("num_docs", "max_new_tokens")
                    if getattr(fl, name)}
        pipeline = rag_common.build_pipeline(fl, False, settings)
        if fl.mode != "closed_book" and pipeline.index is None:
            raise rag_common.InputError(f"{fl.bundle}: the bundle has no index; pass --index")
        items, info = load_items(fl.data, pipeline.index, fl.corpus, fl.format, fl.split,
                                 fl.limit, fl.skip_bad_rows)
        source = {"checkpoint": fl.checkpoint, "bundle": fl.bundle,
                  "index": str(fl.index or getattr(pipeline.index, "path", "")) or None}
        summary = evaluate(pipeline, items, fl.mode, out_dir=fl.out, progress=fl.progress,
                           warmup=fl.warmup, seed=fl.seed, extra={"input": info, **source})
    print(json.dumps(summary))
