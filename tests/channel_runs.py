"""Run by tests/test_channel.py in its own process, at XLA's default optimisation level (the
suite's level 0 makes these hundreds of demo-width steps slower than their compile is saved):
two stage-1 copy runs of bench/channel.py from one random init at the demo's widths, the
product's losses (300 steps) and the published design (100 steps: the MSE term, packed slots,
no span read-out). Prints one JSON line: {"ours": run, "published": run}, each run as
`channel.run_length` returns it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402

from clara_jax.config import load_config_file  # noqa: E402
from clara_jax.data import prompts, world  # noqa: E402
from clara_jax.data.tokenizer import SentencePieceTokenizer  # noqa: E402
from clara_jax.model import ModelConfig, init_params  # noqa: E402
from tests import eval_support as es  # noqa: E402

DOC_TOKENS = 8
DEMO = str(REPO / "configs/demo.py")


def main() -> None:
    channel = es.load_bench("channel")
    cfg = ModelConfig.from_config(load_config_file(DEMO))
    w = world.make_world(0, "small", "train")
    tok = SentencePieceTokenizer.train(list(w.docs.values()) + [q.question for q in w.questions],
                                       512, cfg.num_memory_tokens, seed=0,
                                       extra_texts=prompts.template_texts())
    # The layouts and losses the two runs change give no param another shape: one init serves.
    start = init_params(cfg, jax.random.key(0))

    def run(steps, *overrides):
        config = load_config_file(DEMO, ["train.lambda_retrieval=0", "train.train_base=true",
                                         *channel.COPY_OVERRIDES, *overrides])
        return channel.run_length(config, start, tok, DOC_TOKENS, minutes=30, eval_every=100,
                                  seed=0, max_steps=steps)

    out = {"ours": run(300),
           "published": run(100, "train.mse_weight=0.1", "train.span_weight=0",
                            "model.latent_positions=packed")}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
