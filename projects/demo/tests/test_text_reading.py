"""projects/demo/text_reading.py: its exact-answer score lines answers up with the logits that
predict them, and a short run on the prepared small world reports a curve for both streams."""

from __future__ import annotations

import numpy as np
import pytest

from clara_jax.data.prepare import prepare_world
from tests import eval_support as es


@pytest.fixture(scope="module")
def bench():
    return es.load_script("projects/demo/text_reading.py")


def _next_token_oracle(vocab: int, wrong_rows=()):
    """logits_fn whose argmax at t is the row's token t + 1 (a wrong one in `wrong_rows`)."""
    def logits_fn(_, tokens):
        tokens = np.asarray(tokens)
        nxt = np.concatenate([tokens[:, 1:], tokens[:, -1:]], axis=1)
        for r in wrong_rows:
            nxt[r] = (nxt[r] + 1) % vocab
        return np.eye(vocab, dtype=np.float32)[nxt]
    return logits_fn


def test_exact_rate_scores_whole_answers_at_the_right_offset(bench):
    pairs = [([1, 5, 6, 7], [8, 9, 2]), ([1, 4], [3, 2]), ([1, 6, 6], [9, 2])]
    assert bench.exact_rate(_next_token_oracle(16), None, pairs, pad_id=0) == 1.0
    assert bench.exact_rate(_next_token_oracle(16, wrong_rows=(1,)), None, pairs,
                            pad_id=0) == pytest.approx(2 / 3)

    def shifted(params, tokens):  # predicts each token one position late
        return np.roll(_next_token_oracle(16)(params, tokens), 1, axis=1)

    assert bench.exact_rate(shifted, None, pairs, pad_id=0) == 0.0


@pytest.mark.parametrize("worlds", ["fixed", "fresh"])
def test_short_run_reports_the_curve(tmp_path, bench, worlds):
    config = es.fresh_config(tmp_path / "data")
    prepare_world(tmp_path / "data", config, formats=())
    summary = bench.main(["--data", str(tmp_path / "data"), "--config", "configs/tiny.py",
                          "--steps", "2", "--eval_every", "1", "--questions", "6",
                          "--worlds", worlds, "--size", "small"])
    assert [r["step"] for r in summary["curve"]] == [1, 2]
    assert 0.0 <= summary["heldout_exact"] <= 1.0
    assert ("train_exact" in summary) == (worlds == "fixed")
    assert summary["curve"][-1]["loss"] < 20.0
