"""bench/latent_usage.py on the tiny model and the prepared small world: its `true` answer loss
is the stage-2 training loss's CE on the same batch, and the other fillings change it."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from clara_jax.data.pipeline import make_loader
from clara_jax.data.prepare import prepare_world
from clara_jax.model import ModelConfig
from clara_jax.train.steps import make_loss_fn
from tests import eval_support as es


@pytest.fixture(scope="module")
def bench():
    return es.load_bench("latent_usage")


def test_true_latents_loss_is_the_training_ce(tmp_path, tiny_params, bench):
    config = es.fresh_config(tmp_path / "data")
    prepare_world(tmp_path / "data", config, formats=("stage2",))
    params = es.perturbed(tiny_params)
    es.save_checkpoint(config, params, tmp_path / "run")

    result = bench.measure(tmp_path / "run", tmp_path / "data", stage=2, batches=1)

    batch = next(iter(make_loader(config, 2, tmp_path / "data", split="heldout")))
    batch = {k: jnp.asarray(v) for k, v in batch.items() if k in bench.FIELDS}
    _, metrics = make_loss_fn(config, ModelConfig.from_config(config), 2)(params, batch, None)
    assert result["examples"] == config.train.batch_size
    assert result["target_tokens"] == int(metrics["target_tokens"])
    assert result["true"]["answer_ce"] == pytest.approx(float(metrics["ce"]), abs=1e-3)
    for name in ("other", "zeros"):
        assert result[name]["answer_ce"] != pytest.approx(result["true"]["answer_ce"], abs=1e-4)
    assert result["ce_gain_over_other"] == pytest.approx(
        result["other"]["answer_ce"] - result["true"]["answer_ce"], abs=2e-4)
    for name in bench.FILLINGS:
        assert 0.0 <= result[name]["answer_exact"] <= result[name]["first_token_acc"] <= 1.0
    # Every question is one of the world's types, and the types split the examples.
    by_type = result["by_question_type"]
    assert "other" not in by_type and by_type
    assert sum(t["examples"] for t in by_type.values()) == result["examples"]
    for filling in ("true", "other"):
        mixed = sum(t[f"answer_exact_{filling}"] * t["examples"] for t in by_type.values())
        assert mixed / result["examples"] == pytest.approx(result[filling]["answer_exact"],
                                                           abs=1e-3)


def test_stage1_reports_qa_and_paraphrases_apart(tmp_path, tiny_params, bench):
    config = es.fresh_config(tmp_path / "data")
    prepare_world(tmp_path / "data", config, formats=("stage1",))
    es.save_checkpoint(config, es.perturbed(tiny_params), tmp_path / "run")

    result = bench.measure(tmp_path / "run", tmp_path / "data", stage=1, batches=3)

    qa, para = result["by_kind"]["qa"], result["by_kind"]["paraphrase"]
    assert qa["examples"] > 0 and para["examples"] > 0
    assert qa["examples"] + para["examples"] == result["examples"]
    assert qa["target_tokens"] + para["target_tokens"] == result["target_tokens"]
    for name in bench.FILLINGS:  # the overall CE is the token-weighted mix of the two
        mix = (qa[name]["answer_ce"] * qa["target_tokens"]
               + para[name]["answer_ce"] * para["target_tokens"]) / result["target_tokens"]
        assert result[name]["answer_ce"] == pytest.approx(mix, abs=1e-3)
    # Paraphrases restate the document: longer targets than the QA answers.
    assert para["target_tokens"] / para["examples"] > qa["target_tokens"] / qa["examples"]


def test_a_checkpoint_saved_before_paraphrase_max_len_still_loads(tmp_path, tiny_params,
                                                                 bench):
    config = es.fresh_config(tmp_path / "data")
    prepare_world(tmp_path / "data", config, formats=("stage1",))
    old = es.fresh_config(tmp_path / "data")
    with old.unlocked():
        del old.data["paraphrase_max_len"]
    es.save_checkpoint(old, tiny_params, tmp_path / "run")

    result = bench.measure(tmp_path / "run", tmp_path / "data", stage=1, batches=1)

    assert result["examples"] == config.train.batch_size
