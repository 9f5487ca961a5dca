"""Re-rating a pretrained start (projects.demo.rerate): the suite's tiny start (8x: M = 4 of a
32-token document) made for 4x (M = 8, ids appended) and 16x (M = 2), loaded at that rate,
reading text as before, and continued by pretraining there."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from clara_jax import param_store
from clara_jax.data.tokenizer import check_tokenizer_fits, load_tokenizer
from clara_jax.model import ModelConfig, compress, forward_logits
from projects.demo import pretrain, rerate
from tests.conftest import REPO, TINY_START_ARGS


def _rerated(tiny_start, tiny_config, rate, out):
    if rate == 16:  # one rate through the command line
        cmd = [sys.executable, "-m", "projects.demo.rerate", "--config=configs/tiny.py",
               f"--start={tiny_start[0] / 'out'}", f"--rate={rate}", f"--out={out}"]
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads((out / "rerate.json").read_text())
    return rerate.rerate(tiny_start[0] / "out", rate, int(tiny_config.data.doc_max_len), out)


@pytest.mark.parametrize("rate", [4, 16])
def test_a_re_rated_start_keeps_every_weight_but_its_memory_tokens(rate, tiny_start,
                                                                   tiny_config, tmp_path):
    src = tiny_start[0] / "out"
    info = _rerated(tiny_start, tiny_config, rate, tmp_path / "r")
    old_tok = load_tokenizer(src / pretrain.TOKENIZER_DIR)
    tok = load_tokenizer(tmp_path / "r" / pretrain.TOKENIZER_DIR)
    m = int(tiny_config.data.doc_max_len) // rate
    assert (info["num_memory_tokens_from"], info["num_memory_tokens"]) == (4, m)
    assert tok.num_memory_tokens == m
    config = rerate.config_at_rate(tiny_config, rate, tmp_path / "r")
    check_tokenizer_fits(tok, config)
    cfg, old_cfg = ModelConfig.from_config(config), ModelConfig.from_config(tiny_config)
    params = pretrain.load_params(tmp_path / "r" / pretrain.PARAMS_FILE, cfg)
    old_params = pretrain.load_params(src / pretrain.PARAMS_FILE, old_cfg)

    new, old = param_store.flatten(params), param_store.flatten(old_params)
    assert set(new) == set(old)
    for k in set(old) - {"memory_embeddings", "decoder/embedding", "decoder/unembed"}:
        np.testing.assert_array_equal(new[k], old[k], err_msg=k)
    # Each new memory token is the old one whose span holds the end of its own.
    want = {4: [0, 0, 1, 1, 2, 2, 3, 3], 16: [1, 3]}[rate]
    assert info["memory_rows"] == want
    np.testing.assert_array_equal(new["memory_embeddings"], old["memory_embeddings"][want])
    # Appended memory symbols take the last old one's rows; every text id keeps its own.
    v = old["decoder/embedding"].shape[0]
    fresh = [i for i in tok.mem_ids if i not in old_tok.mem_ids]
    assert len(fresh) == max(m - 4, 0)
    for i in fresh:
        np.testing.assert_array_equal(new["decoder/embedding"][i],
                                      old["decoder/embedding"][old_tok.mem_ids[-1]])
    text = np.array([old_tok.encode("Background: the river Elm runs north.")], np.int32)
    np.testing.assert_allclose(np.asarray(forward_logits(cfg, params, text))[..., :v],
                               np.asarray(forward_logits(old_cfg, old_params, text)),
                               atol=1e-5)
    doc = np.array([old_tok.encode("The Golden Winter first appeared in 1812.")[:32]],
                   np.int32)
    latents = np.asarray(compress(cfg, params, doc, np.ones(doc.shape, bool)))
    assert latents.shape == (1, m, cfg.latent_width) and np.isfinite(latents).all()


def test_a_re_rated_start_pretrains_at_its_rate(tiny_start, tiny_config, tmp_path):
    rerate.rerate(tiny_start[0] / "out", 4, int(tiny_config.data.doc_max_len), tmp_path / "r")
    tok_dir = tmp_path / "r" / pretrain.TOKENIZER_DIR
    config = rerate.config_at_rate(tiny_config, 4, tmp_path / "r")
    summary = pretrain.pretrain(config, tok_dir, tmp_path / "out", log=lambda _: None,
                                init_params=tmp_path / "r" / pretrain.PARAMS_FILE,
                                **{**TINY_START_ARGS, "first_seed": 5000})
    assert summary["steps"] == 2
    for k in ("stage1_ce_right", "stage2_ce_right"):
        assert np.isfinite(summary["last"][k])
    out = pretrain.find_pretrained(tmp_path / "out")
    assert load_tokenizer(out / pretrain.TOKENIZER_DIR).num_memory_tokens == 8
    params = pretrain.load_params(out / pretrain.PARAMS_FILE, ModelConfig.from_config(config))
    assert params["memory_embeddings"].shape[0] == 8


def test_importing_rerate_defines_no_flags_the_commands_define():
    # The suite imports it in-process beside the `clara` commands (which define --out).
    code = "import projects.demo.rerate, clara_jax.commands.eval"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
