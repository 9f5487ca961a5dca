"""The language-model warm-up (projects.demo.warmup) on the tiny model and the small world:
the next-token loss falls, only the base decoder moves, and stage 1 starts from its
checkpoint."""

from __future__ import annotations

import json

import jax
import numpy as np

from clara_jax.data.prepare import prepare_world
from clara_jax.data.tokenizer import load_tokenizer
from clara_jax.model import init_params, param_group
from clara_jax.model.config import ModelConfig
from clara_jax.train import checkpoint as ckpt
from projects.demo.warmup import lm_warmup, warmup_rows
from tests import eval_support as es
from tests.conftest import one_device_target


def test_warmup_trains_the_base_only_and_stage1_starts_from_it(tmp_path):
    data = tmp_path / "data"
    config = es.fresh_config(data)
    prepare_world(data, config, formats=("stage1", "corpus"))
    tok = load_tokenizer(data / "tokenizer")
    rows = warmup_rows(data, tok, int(config.data.doc_max_len),
                       int(config.data.question_max_len))
    docs = (data / "train" / "corpus.jsonl").read_text().splitlines()
    qa = [json.loads(x) for x in (data / "train" / "stage1.jsonl").read_text().splitlines()]
    qa = [r for r in qa if r["data_type"] == "qa"]
    assert len(rows) == len(docs) + sum(len(r["question"]) for r in qa)
    assert all(r[0] == tok.bos_id and r[-1] == tok.eos_id for r in rows)
    last = rows[-1]  # the last question, answered after its document's text
    assert last[-1 - len(tok.encode(" " + qa[-1]["answers"][-1])):-1] == tok.encode(
        " " + qa[-1]["answers"][-1])

    config.train.batch_size = 8
    summary = lm_warmup(config, data, tmp_path / "warm", tok, steps=40, learning_rate=3e-3,
                        progress=False)
    assert summary["last_loss"] < summary["first_loss"] - 0.5
    assert lm_warmup(config, data, tmp_path / "warm", tok, 40, 3e-3, False) == summary

    cfg = ModelConfig.from_config(config)
    start = init_params(cfg, jax.random.key(int(config.train.seed)))

    target = one_device_target(config, cfg)
    params, meta = ckpt.restore_params(tmp_path / "warm", target)
    assert meta["stage"] == 1 and meta["train_base"] and meta["warmup_steps"] == 40
    moved = {}
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(start),
                            jax.tree.leaves(params)):
        group = param_group(path)
        moved[group] = moved.get(group, False) or not np.allclose(a, b)
    assert moved.pop("base") and not any(moved.values()), moved
