"""The demo (`python -m projects.demo.run`) end to end on the tiny config: data, three
stages, index, three modes, report. Tiny step counts: this checks the job's plumbing and
outputs, not answer quality."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from clara_jax.config import ConfigError, base_config
from projects.demo.config import validate_demo, with_demo
from tests.conftest import REPO

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_demo_runs_every_step_from_a_pretrained_model_and_writes_the_report(tmp_path,
                                                                          tiny_config,
                                                                          tiny_start):
    """demo.pretrained, as `make demo` runs: the data is built with the pretrained tokenizer
    and stage 1 starts from its params; then three stages, the index, three modes and the
    report; a re-run reuses every step; a workdir built with another tokenizer is refused.
    (The warm-up start, for rates without a pretrained model, runs in
    tests/test_quality_bench.py.)"""
    from clara_jax.data import prepare

    # A copy: the last part of this test replaces the start's tokenizer.
    shutil.copytree(tiny_start[0] / "out", tmp_path / "pt")
    work = tmp_path / "work"
    cmd = [sys.executable, "-m", "projects.demo.run", "--config=projects/demo/config.py:tiny",
           f"--workdir={work}", "--progress=false", "--config.demo.stage_steps=(2,2,2)",
           "--config.demo.eval_questions=12", "--config.demo.eval_batch_size=4",
           "--config.train.log_every=1", f"--config.demo.pretrained={tmp_path / 'pt'}",
           "--config.data.text_share=0.5"]  # text rows in stages 2-3, as configs/demo.py has
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (work / "data" / "tokenizer" / "tokenizer.model").read_bytes() == (
        tmp_path / "pt" / "tokenizer" / "tokenizer.model").read_bytes()
    start = json.loads((work / "pretrained" / "pretrained.json").read_text())
    assert start["pretrained"] == str(tmp_path / "pt")
    assert f"initialised from {work / 'pretrained'}" in out.stdout + out.stderr
    assert not (work / "warmup").exists()

    results = json.loads((work / "results.json").read_text())
    held = results["heldout"]
    assert set(held) == {"closed_book", "text_rag", "latent_rag"}
    for mode, row in held.items():
        for metric in ("em", "f1", "cover_em"):
            assert 0.0 <= row[metric] <= 1.0, (mode, metric)
        assert row["ms_per_answer"] > 0
        assert row["questions"] == 12
    assert 0.0 <= held["latent_rag"]["recall_at_5"] <= 1.0
    assert "recall_at_5" not in held["closed_book"]
    # The summary's scores are the means of the written per-question predictions.
    preds = [json.loads(x) for x in
             (work / "eval" / "latent" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 12
    assert abs(sum(p["scores"]["f1"] for p in preds) / 12 - held["latent_rag"]["f1"]) < 1e-9
    closed = [json.loads(x) for x in
              (work / "eval" / "closed_book" / "predictions.jsonl").read_text().splitlines()]
    vs = results["latent_rag_vs"]["closed_book"]
    assert vs["only_latent_rag"] == sum(p["scores"]["em"] > q["scores"]["em"]
                                        for p, q in zip(preds, closed))
    assert vs["only_closed_book"] == sum(q["scores"]["em"] > p["scores"]["em"]
                                         for p, q in zip(preds, closed))
    assert 0.0 < vs["sign_test_p"] <= 1.0 and "text_rag" in results["latent_rag_vs"]
    assert "latent_rag vs closed_book: only latent_rag exact on" in out.stdout
    # By hops and question type: the groups partition the questions, and each group's EM is
    # the mean over its predictions.
    by = results["by_question"]["latent_rag"]
    assert by["single_hop"]["questions"] + by["two_hop"]["questions"] == 12
    assert sum(c["questions"] for c in by["types"].values()) == 12
    assert "unknown" not in by["types"] and all("." in t for t in by["types"])
    single = [p["scores"]["em"] for p in preds if p["hops"] == 1]
    if single:
        assert abs(by["single_hop"]["em"] - sum(single) / len(single)) < 1e-4
    assert "| single_hop |" in out.stdout
    for stage in (1, 2, 3):
        steps = [json.loads(x)["step"] for x in
                 (work / f"stage{stage}" / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2]
    for png in ("losses.png", "scores.png"):
        assert (work / png).read_bytes()[:8] == PNG_MAGIC
    assert "| latent_rag |" in out.stdout and "Q: " in out.stdout and "latent docs:" in out.stdout

    # Re-running reuses every finished step (no stage trains again) and reports again.
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "compiled stage-" not in again.stdout + again.stderr

    other = tmp_path / "other_tok"
    prepare.world_tokenizer(tiny_config, 5, "small").save(other)
    (tmp_path / "pt" / "tokenizer" / "tokenizer.model").write_bytes(
        (other / "tokenizer.model").read_bytes())
    refused = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert refused.returncode != 0
    assert "built with another tokenizer" in refused.stderr


@pytest.mark.parametrize("field,value", [("stage_steps", (10, 0, 5)),
                                         ("world_size", "large/small"),
                                         ("swap_answers", 1.5)])
def test_demo_section_is_validated(field, value):
    c = with_demo(base_config())
    validate_demo(c)
    c.demo[field] = value
    with pytest.raises(ConfigError, match=f"config.demo.{field}="):
        validate_demo(c)
