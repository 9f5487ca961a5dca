"""`python -m projects.demo.run_pretrain --config=C --tokenizer=DIR --out=OUT --seconds=S`:
the whole model trained on a stream of freshly generated worlds (projects.demo.pretrain), the
starting point that `config.demo.pretrained` names. Writes OUT/params.safetensors,
OUT/tokenizer/ and OUT/pretrain.json; prints one JSON line per evaluation."""

from __future__ import annotations

import sys

from absl import app, flags

from clara_jax.commands.common import check_config_args, define_config_flag, load_config

define_config_flag()
flags.DEFINE_string("tokenizer", None, "Tokenizer directory the model and the demo share.")
flags.DEFINE_string("out", None, "Output directory.")
flags.DEFINE_float("seconds", None, "Training time budget in seconds (compilation excluded).")
flags.DEFINE_integer("batch_size", 128, "Examples per step (each step is one stage).")
flags.DEFINE_float("lr", 1e-3, "Learning rate, constant after 200 warm-up steps.")
flags.DEFINE_float("lambda_retrieval", 0.25, "Weight of the in-batch retrieval InfoNCE.")
flags.DEFINE_integer("workers", None, "World-generating processes (default: CPUs - 2).")
flags.DEFINE_float("eval_every_s", 60.0, "Seconds of training between evaluations (and saves).")
flags.DEFINE_enum("size", "medium", ["small", "medium"], "Size of each generated world.")
flags.DEFINE_integer("first_seed", 1000, "Seed of the first world (later ones count up).")
flags.DEFINE_string("init_params", None, "A params.safetensors to continue from.")
flags.DEFINE_list("stages", ["1", "2"], "Stages whose steps take turns.")
flags.DEFINE_bool("focus", False, "Cut stage-1 documents to the sentences naming their subject.")
flags.DEFINE_bool("qa_only", False, "Stage 1 without paraphrase targets.")
flags.DEFINE_float("bow_weight", 0.0, "Weight of the bag-of-words loss (0: none).")


def main(argv) -> None:
    import os

    from projects.demo import pretrain  # world workers import it alone

    del argv
    fl = flags.FLAGS
    for name in ("tokenizer", "out", "seconds"):
        if fl[name].value is None:
            raise flags.IllegalFlagValueError(f"--{name} is required")
    workers = fl.workers or max(1, (os.cpu_count() or 2) - 2)
    pretrain.pretrain(load_config(), fl.tokenizer, fl.out, fl.seconds, fl.batch_size, fl.lr,
                      fl.lambda_retrieval, workers, fl.eval_every_s, size=fl.size,
                      first_seed=fl.first_seed, init_params=fl.init_params,
                      stages=tuple(int(x) for x in fl.stages), focus=fl.focus,
                      qa_only=fl.qa_only, bow_weight=fl.bow_weight)


if __name__ == "__main__":
    sys.argv[1:] = check_config_args(sys.argv[1:])  # --config's path, the override names
    app.run(main)
