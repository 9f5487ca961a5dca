"""bench/quality.py end to end on the tiny config: two compression rates, two steps per stage,
eight held-out questions, each rate from its own start. Checks the plumbing and the report
(tables, JSON, files), not answer quality (two steps learn nothing). About 2 minutes on a 2-core
CPU, mostly compiling the seven training steps (three stages per rate plus the InfoNCE stage 3).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys

from tests.conftest import REPO

ROWS = ("closed book", "text RAG (8x retrieval)", "latent RAG 8x", "latent RAG 16x")


def _in_unit(v) -> bool:
    return v is not None and 0.0 <= v <= 1.0


def _quality():
    spec = importlib.util.spec_from_file_location("quality", REPO / "bench" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_rate_without_a_start_of_its_own_starts_from_the_warm_up(tmp_path, tiny_start,
                                                                    tiny_config):
    from projects.demo import rerate
    from projects.demo.config import with_demo

    quality = _quality()
    pt = tmp_path / "start"
    shutil.copytree(tiny_start[0] / "out", pt)
    config = with_demo(tiny_config.copy_and_resolve_references())
    config.demo.pretrained = str(pt)
    alone = quality.rate_config(config, 4, warmup_steps=7)
    assert (alone.demo.pretrained, alone.demo.warmup_steps) == ("", 7)
    assert alone.model.num_memory_tokens == 8
    info = rerate.rerate(pt, 4, int(config.data.doc_max_len), tmp_path / "start_4x")
    own = quality.rate_config(config, 4, warmup_steps=7)
    assert own.demo.pretrained == str(tmp_path / "start_4x")
    assert own.model.vocab_size == max(int(config.model.vocab_size), info["vocab_size"])
    assert quality.rate_config(config, 8).demo.pretrained == str(pt)


def test_quality_bench_writes_both_tables(tmp_path, tiny_start, tiny_config):
    # The pretrained start of the tiny model serves its rate (8x); 16x starts from the start
    # re-rated to it (projects.demo.rerate), found beside it as START_16x.
    from projects.demo import rerate

    pt = tmp_path / "start"
    shutil.copytree(tiny_start[0] / "out", pt)
    rerate.rerate(pt, 16, int(tiny_config.data.doc_max_len), tmp_path / "start_16x")
    work = tmp_path / "work"
    cmd = [sys.executable, "bench/quality.py", "--config=configs/tiny.py",
           f"--workdir={work}", "--rates=8,16", "--baseline_rate=8", "--steps=2,2,2",
           "--questions=8", "--warmup_steps=3", "--set=demo.eval_batch_size=4",
           "--set=train.log_every=1",
           f"--set=demo.pretrained={pt}", "--progress=false"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]

    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert last == json.loads((work / "quality.json").read_text())
    assert last["starts"] == {"8": f"pretrained {pt}", "16": f"pretrained {pt}_16x"}
    assert not (work / "rate8" / "warmup").exists() and not (work / "rate16" / "warmup").exists()
    for m, start in (("m4", pt), ("m2", tmp_path / "start_16x")):
        assert (work / "data" / m / "tokenizer" / "tokenizer.model").read_bytes() == (
            start / "tokenizer" / "tokenizer.model").read_bytes()
    assert [r["row"] for r in last["rows"]] == list(ROWS)
    for r in last["rows"]:
        assert r["questions"] == 8
        assert r["single_hop_questions"] + r["two_hop_questions"] == 8, r
        for key in ("em", "f1"):
            assert _in_unit(r[key]), (r["row"], key)
        for part in ("single_hop", "two_hop"):
            if r[f"{part}_questions"]:
                assert _in_unit(r[f"{part}_em"]) and _in_unit(r[f"{part}_f1"]), (r["row"], part)
        assert r["ms_per_answer"] > 0
        if r["mode"] == "closed_book":
            assert r["recall_at_5"] is None
        else:
            assert _in_unit(r["recall_at_5"]), r["row"]

    ret = last["retrievers"]
    assert ret["rate"] == 8 and len(ret["rows"]) == 3
    for r in ret["rows"]:
        for k in (1, 3, 5):
            assert _in_unit(r[f"recall_at_{k}"]), (r["retriever"], k)
        assert r["recall_at_1"] <= r["recall_at_3"] <= r["recall_at_5"]
        # Stage 3 freezes the compressor: every retriever searches the same document latents.
        assert r["index_shared"], r["retriever"]
    # Retrieval alone with the trained reasoner is the latent evaluation's retrieval.
    assert ret["rows"][0]["recall_at_5"] == ret["latent_eval_recall_at_5"]
    assert (work / "rate8" / "stage3_infonce" / "metrics.jsonl").exists()
    # The tokenizer reserves M memory symbols: one prepared world per M (32/8 and 32/16).
    assert (work / "data" / "m4" / "prepare.json").exists()
    assert (work / "data" / "m2" / "prepare.json").exists()

    usage = last["latent_usage"]
    assert set(usage) == {"8", "16"}
    for rate, u in usage.items():
        assert u["checkpoint"].endswith(f"rate{rate}/stage2") and u["examples"] > 0
        assert u["ce_gain_over_other"] == round(
            u["other"]["answer_ce"] - u["true"]["answer_ce"], 4)

    # Each rate's latent answers paired with the baselines' (at 8x) on the same questions.
    def em(path):
        return [json.loads(x)["scores"]["em"] for x in path.read_text().splitlines()]
    assert [p["rate"] for p in last["paired"]] == [8, 16]
    for p in last["paired"]:
        latent = em(work / f"rate{p['rate']}" / "eval" / "latent" / "predictions.jsonl")
        for base, key in (("closed_book", "closed_book"), ("text", "text_rag")):
            other = em(work / "rate8" / "eval" / base / "predictions.jsonl")
            assert p[base][f"only_{key}"] == sum(b > a for a, b in zip(latent, other))
            assert p[base]["only_latent_rag"] == sum(a > b for a, b in zip(latent, other))
            assert 0.0 < p[base]["sign_test_p"] <= 1.0

    md = (work / "quality.md").read_text()
    assert "| latent RAG 8x | " in md and "only latent / only closed book" in md
    assert "| 8x |" in md and "| 16x |" in md
    for row in ROWS:
        assert f"| {row} |" in md
    for name in ("trained query reasoner", "stage-2 compressor keys", "supervised InfoNCE"):
        assert name in md
    assert last["total_seconds"] > 0 and last["phases_seconds"]["rate8/train"] > 0
    assert "--rates=8,16" in last["command"]
