"""The demo's report: results.json, PNG plots of the loss curves and the scores by mode, and
the printed table. Plots use matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

MODE_KEYS = {"closed_book": "closed_book", "text": "text_rag", "latent": "latent_rag"}


def results_json(summaries: dict[str, dict]) -> dict:
    """{'heldout': {'closed_book': {em, f1}, 'text_rag': {...}, 'latent_rag': {em, f1,
    recall_at_5, ms_per_answer}}} from the evaluation summaries by mode."""
    out = {}
    for mode, s in summaries.items():
        row = {"em": s["em"], "f1": s["f1"], "cover_em": s["cover_em"],
               "ms_per_answer": s["ms_per_answer"], "questions": s["questions"]}
        if s.get("recall_at_5") is not None:
            row["recall_at_5"] = s["recall_at_5"]
        out[MODE_KEYS[mode]] = row
    return {"heldout": out}


def paired_em(preds: dict[str, list[dict]], mode: str, baseline: str) -> dict:
    """How `mode` and `baseline` differ on the same questions (per-question predictions as
    `clara_jax.eval.job.evaluate` returns them, in the same order): questions only one of them
    answers exactly, and the two-sided exact sign test on those (the chance that a coin gives a
    split at least this uneven: the win is clear when it is small)."""
    a, b = preds[mode], preds[baseline]
    if [p["line"] for p in a] != [p["line"] for p in b]:
        raise ValueError(f"{mode} and {baseline} predictions are not of the same questions")
    only_a = sum(p["scores"]["em"] > q["scores"]["em"] for p, q in zip(a, b))
    only_b = sum(q["scores"]["em"] > p["scores"]["em"] for p, q in zip(a, b))
    n = only_a + only_b
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2 ** n
    return {f"only_{MODE_KEYS[mode]}": only_a, f"only_{MODE_KEYS[baseline]}": only_b,
            # Significant digits, not decimals: a clear win's p (2e-13 at 43 against 0) must
            # not be written as 0.
            "sign_test_p": float(f"{min(1.0, 2.0 * tail):.6g}")}


def em_by_question_type(preds: dict[str, list[dict]], qtype_of: dict[str, str]) -> dict:
    """Exact match of each mode by hops and by question type.

    preds: per-question predictions by mode (as `clara_jax.eval.job.evaluate` returns them);
    qtype_of: question text -> its type (the world's `Question.qtype`, "kind.attr", or
    "kind.attr>attr" for two hops). Returns {mode key: {'single_hop', 'two_hop': {questions,
    em}, 'types': {qtype: {questions, em}}}}, types sorted by name."""
    out = {}
    for mode, rows in preds.items():
        groups: dict[str, list[float]] = {}
        hops: dict[str, list[float]] = {"single_hop": [], "two_hop": []}
        for r in rows:
            em = float(r["scores"]["em"])
            groups.setdefault(qtype_of.get(r["question"], "unknown"), []).append(em)
            hops["two_hop" if r["hops"] >= 2 else "single_hop"].append(em)

        def cell(v: list[float]) -> dict:
            return {"questions": len(v), "em": round(sum(v) / len(v), 4) if v else None}

        out[MODE_KEYS[mode]] = {**{k: cell(v) for k, v in hops.items()},
                                "types": {t: cell(groups[t]) for t in sorted(groups)}}
    return out


def type_table(by_type: dict) -> str:
    """Markdown table of `em_by_question_type`: one row per hop count and question type, one
    EM column per mode."""
    modes = list(by_type)
    first = by_type[modes[0]]
    lines = ["| questions | n | " + " | ".join(modes) + " |",
             "| --- | --- | " + " | ".join("---" for _ in modes) + " |"]
    keys = [("single_hop", None), ("two_hop", None)] + [(t, "types") for t in first["types"]]
    for key, group in keys:
        cells = [(by_type[m][group] if group else by_type[m])[key] for m in modes]
        if not cells[0]["questions"]:
            continue
        ems = " | ".join("-" if c["em"] is None else f"{c['em']:.2f}" for c in cells)
        lines.append(f"| {key} | {cells[0]['questions']} | {ems} |")
    return "\n".join(lines)


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _pyplot():
    """matplotlib.pyplot on the Agg backend (no display on a TPU host)."""
    # Lazy: only the plots need matplotlib, and the backend must be chosen before pyplot is
    # imported.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(stage_dirs: Sequence[Path], out: Path) -> None:
    """One panel per stage: training loss by step (and held-out eval loss when logged)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(stage_dirs), figsize=(4.2 * len(stage_dirs), 3.2))
    for ax, d in zip(axes, stage_dirs):
        rows = read_metrics(d / "metrics.jsonl")
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], ".-", label="train")
        ev = read_metrics(d / "eval_metrics.jsonl")
        if ev:
            ax.plot([r["step"] for r in ev], [r["loss"] for r in ev], "o-", label="held-out")
        ax.set_title(d.name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_scores(results: dict, out: Path) -> None:
    """Grouped bars of EM, F1 and cover-EM per mode on the held-out world."""
    plt = _pyplot()
    modes = list(results["heldout"])
    metrics = ["em", "f1", "cover_em"]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    width = 0.8 / len(metrics)
    for j, m in enumerate(metrics):
        xs = [i + (j - 1) * width for i in range(len(modes))]
        ax.bar(xs, [results["heldout"][mode][m] for mode in modes], width, label=m)
    ax.set_xticks(range(len(modes)), modes)
    ax.set_ylim(0, 1)
    ax.set_ylabel("score (held-out world)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def table(results: dict) -> str:
    """Markdown table: mode, EM, F1, cover-EM, Recall@5, ms per answer."""
    lines = ["| mode | EM | F1 | cover-EM | Recall@5 | ms / answer |",
             "| --- | --- | --- | --- | --- | --- |"]
    for mode, r in results["heldout"].items():
        rec = r.get("recall_at_5")
        lines.append(f"| {mode} | {r['em']:.3f} | {r['f1']:.3f} | {r['cover_em']:.3f} | "
                     f"{'-' if rec is None else f'{rec:.3f}'} | {r['ms_per_answer']:.1f} |")
    return "\n".join(lines)
