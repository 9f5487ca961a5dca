"""`clara train --config=configs/X.py --workdir=W [--data_dir=D] [--init_from=DIR |
--init_from_hf=DIR]`: trains stage `train.stage` on the data built by `clara data build`
(or `clara data world`), resuming from W's latest checkpoint when there is one.

Exit status: 0 when done or after SIGTERM (a checkpoint was saved), 1 on a non-finite loss
under train.nan_policy='stop' (the message names the last good checkpoint) or bad input.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import flags

from clara_jax.commands.common import define_config_flag, load_config

define_config_flag()
flags.DEFINE_string("workdir", None, "Run directory, a local path or gs://bucket/...: "
                    "checkpoints, metrics.jsonl, tb/.")
flags.DEFINE_string("data_dir", None,
                    "Built data directory (default: config.train.data_dir), as written by "
                    "`clara data build` / `clara data world`.")
flags.DEFINE_string("init_from", None,
                    "Start from the latest checkpoint of a previous stage's workdir.")
flags.DEFINE_string("init_from_hf", None,
                    "Start from Hugging Face weights: a checkpoint directory (config.json + "
                    "safetensors) or a `clara convert from-hf` output directory.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")


def main(argv) -> None:
    del argv
    from clara_jax.data.pipeline import make_loader
    from clara_jax.data.tfds_build import TOKENIZER_DIR
    from clara_jax.train import checkpoint as ckpt
    from clara_jax.train.loop import NonFiniteLossError, train

    fl = flags.FLAGS
    if not fl.workdir:
        raise flags.IllegalFlagValueError("--workdir is required")
    config = load_config()
    data_dir = fl.data_dir or config.train.data_dir
    if not data_dir:
        raise flags.IllegalFlagValueError(
            "no data: pass --data_dir=DIR or --config.train.data_dir=DIR (a directory built by "
            "`clara data world` or `clara data build`)")
    # Absolute, so the checkpoints' config finds the data from any directory.
    data_dir = str(Path(data_dir).absolute())
    config.train.data_dir = data_dir
    tok_dir = Path(data_dir) / TOKENIZER_DIR
    if not (tok_dir / "clara_tokenizer.json").is_file():
        raise flags.IllegalFlagValueError(
            f"--data_dir={data_dir}: no tokenizer in {tok_dir} (not a directory built by "
            "`clara data world --config=...` or `clara data build`)")

    def loader_factory(cfg, stage, split):
        return make_loader(cfg, stage, data_dir, split=split)

    try:
        result = train(config, fl.workdir, loader_factory, init_from=fl.init_from,
                       init_from_hf=fl.init_from_hf, progress=fl.progress, tokenizer_dir=tok_dir)
    except (NonFiniteLossError, ckpt.CheckpointError) as err:
        print(f"clara train: {err}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps({"status": result.status, "step": result.step,
                      "checkpoints": result.checkpoint, **result.last_metrics}))
