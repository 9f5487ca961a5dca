"""Quality benchmark: the demo's pipeline with a larger budget, at several compression rates.

    .venv/bin/python bench/quality.py [--config configs/demo.py] [--workdir runs/quality]
        [--rates 4,16,64] [--steps 600,300,150] [--questions 400] [--world medium/small]
        [--baseline_rate 16] [--set train.batch_size=32 ...]

What it measures, all on the held-out world (questions and documents never seen in training):
  * for each compression rate r (data.compression_rate; M = doc_max_len / r memory tokens):
    stages 1 -> 2 -> 3 trained from the rate's start (WORKDIR/rate{r}/stage{1,2,3}; Starts
    below), the held-out ScaNN
    index built with the stage-3 checkpoint's compressor, and latent RAG evaluated on
    `--questions` held-out questions: EM / F1 overall, on single-hop and on two-hop questions
    (`hops` = number of gold documents), Recall@5, ms per answer;
  * at `--baseline_rate` also closed book and text RAG (the documents' text in the prompt,
    retrieved by the same trained query reasoner, hence "16x retrieval"), and latent RAG at
    every rate paired with both on the same questions (`report.paired_em`: questions only one
    side answers exactly, two-sided exact sign test);
  * at `--baseline_rate`, Recall@1/3/5 of retrieval alone for three query encoders over the
    same document latents: (a) the trained stage-3 query reasoner; (b) the stage-2
    compressor's keys (the stage-2 checkpoint with the query adapter set to a copy of the
    compressor adapter, `init_query_adapter`: questions encoded exactly like documents);
    (c) a supervised retriever: stage 3 trained from the same stage-2 checkpoint with
    train.lambda_infonce=1.0 (WORKDIR/rate{r}/stage3_infonce).
    Stage 3 freezes the compressor, so all three share the stage-2 compressor's document
    latents; each index is opened with its model's identity (compressor checksum) and is only
    rebuilt when that identity differs.

Starts. A pretrained start serves one M (its tokenizer reserves M memory symbols, its params
hold M memory embeddings). The config's own rate starts from demo.pretrained (the demo's
projects/demo/start, 4x with the copy path); rate r from `{demo.pretrained}_{r}x` when that
directory exists (projects/demo/start_16x, the start the 4x one was re-rated from, and
start_64x, it re-rated by projects.demo.rerate and pretrained at 64x), with model.vocab_size
its embedding rows and the model options it was made without (the copy path) off
(`projects.demo.rerate.config_at_rate`); else from the language-model warm-up
(`--warmup_steps`). quality.json["starts"] names each rate's.

Data. The prepared data depends on M: the SentencePiece tokenizer reserves one symbol per
memory token (so its learned pieces, and the corpus chunking done with it, change with M), and
a pipeline refuses a tokenizer whose M differs from the model's. The world is therefore
prepared once per distinct M into WORKDIR/data/m{M} (about 2 s each) and reused on re-runs.

Everything finished (data, stages, indexes) is reused, so an interrupted run resumes.
Outputs: WORKDIR/quality.json, WORKDIR/quality.md (the tables), per-mode predictions in
WORKDIR/rate{r}/eval/<mode>/; the last printed line is the JSON object of quality.json.

Time with the defaults: an ESTIMATE (the full run has not been timed). Per-step times at
batch 16 on an idle 2-core CPU, demo config at 16x: about 0.4 s (stage 1), 1 s (stage 2), 1 s
(stage 3). The generator reads K*M latent slots, so stages 2-3 cost more at 4x and a little
less at 64x; bench/train_step.py (full-length batches, measured on a shared machine, so slower
in absolute terms) gives per-step ratios to 16x of 1.65 / 1.32 (stage 2 / stage 3) at 4x and
0.92 / 0.90 at 64x. Training: 4x ~ 240 + 495 + 198 s, 16x ~ 240 + 300 + 150 s, 64x ~ 240 +
276 + 135 s, InfoNCE stage 3 ~ 150 s: about 40 min; plus ten step compilations, data (~2 s per
M), three indexes and six evaluations of 400 questions (tens of ms per answer): about 45-50
minutes in all on an idle machine. On a CPU shared with other jobs, expect up to 2-2.5x that.

Measured: `--steps 400,100,50` (the README's table, every rate from its own start) took
1,907 s on this 2-core CPU with nothing else running (training 622 / 549 / 514 s at 4x / 16x /
64x, plus 109 s for the InfoNCE stage 3; data 11-13 s per M; indexes and evaluations under 2
min). Re-running on a finished workdir re-evaluates only: about 2 minutes.

Reproduce:  .venv/bin/python bench/quality.py --workdir runs/quality --steps 400,100,50
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import functools
import importlib.util
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from clara_jax.config import finalize  # noqa: E402
from clara_jax.data.world import WORLD_SIZES  # noqa: E402
from clara_jax.fileio import atomic_write_json, atomic_write_text  # noqa: E402
from projects.demo.config import with_demo  # noqa: E402

RECALL_KS = (1, 3, 5)


def load_config(path: str, overrides: list[str]):
    """The config file's get_config(arg) ("FILE[:ARG]") with KEY=VALUE overrides (values parsed
    as Python literals when they are, else kept as strings), validated."""
    file, _, arg = path.partition(":")
    full = Path(file) if Path(file).is_absolute() else REPO / file
    spec = importlib.util.spec_from_file_location("quality_config", full)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = with_demo(module.get_config(arg))  # the demo's section, for configs without one
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        node = config
        *parents, leaf = key.split(".")
        try:
            for p in parents:
                node = node[p]
            old = node[leaf]
        except KeyError:
            raise SystemExit(f"--set {item!r}: config has no field {key!r}") from None
        if isinstance(old, bool):
            new = value.lower() in ("1", "true", "yes")
        elif isinstance(old, str):
            new = value
        else:
            try:
                new = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                raise SystemExit(f"--set {item!r}: {value!r} is not a literal") from None
            new = type(old)(new) if isinstance(old, (int, float)) else new
        node[leaf] = new
    return finalize(config)


def _ints(text: str, flag: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"{flag}={text!r}: expected comma-separated integers") from None
    if not out or min(out) <= 0:
        raise SystemExit(f"{flag}={text!r}: expected positive integers")
    return out


@functools.cache
def latent_usage():
    """bench/latent_usage.py as a module (bench/ is not a package), loaded once."""
    spec = importlib.util.spec_from_file_location("latent_usage",
                                                  Path(__file__).with_name("latent_usage.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The start of rates that have no pretrained start of their own: the demo's former
# language-model warm-up (projects.demo.warmup).
FALLBACK_WARMUP_STEPS = 150


def rate_start(pretrained: str, rate: int) -> str | None:
    """The directory of the start made for `rate` beside `pretrained` (`{pretrained}_{rate}x`,
    e.g. projects/demo/start_64x: a start re-rated by projects.demo.rerate, then pretrained
    at that rate), or None when there is none."""
    from projects.demo.pretrain import find_pretrained

    try:
        return str(find_pretrained(f"{pretrained.rstrip('/')}_{int(rate)}x"))
    except FileNotFoundError:
        return None


def rate_config(config, rate: int, warmup_steps: int = FALLBACK_WARMUP_STEPS):
    """`config` at data.compression_rate=rate, finalized again so that M is recomputed. The
    pretrained start (demo.pretrained) has the memory tokens of the config's own rate; another
    rate starts from its own start (`rate_start`, run as `config_at_rate` says: its vocabulary,
    without the options it was made without) or, without one, from the language-model
    warm-up."""
    from projects.demo.rerate import config_at_rate

    c = copy.deepcopy(config)
    own = None
    if c.demo.pretrained and int(rate) != int(c.data.compression_rate):
        own = rate_start(str(c.demo.pretrained), rate)
        if own is None:
            c.demo.pretrained = ""
            c.demo.warmup_steps = int(warmup_steps)
        else:
            c.demo.pretrained = own
    try:
        if own is not None:
            return config_at_rate(c, rate, own)
        c.data.compression_rate = int(rate)
        return finalize(c)
    except ValueError as e:
        raise SystemExit(f"--rates: {e}") from None


def retrieval_recall(pipe, items, batch_size: int) -> dict:
    """Recall@1/3/5 of retrieval alone (query encoder + index search, no generation) over the
    items whose gold documents map to index ids; also Recall@5 by number of hops."""
    from clara_jax.eval.metrics import recall_at_k

    rows = [it for it in items if it.relevant]
    hits: dict[int, list[float]] = {k: [] for k in RECALL_KS}
    by_hops: dict[str, list[float]] = {}
    for lo in range(0, len(rows), batch_size):
        batch = rows[lo:lo + batch_size]
        res = pipe.retrieve([it.question for it in batch], max(RECALL_KS))
        for it, ids in zip(batch, res.ids):
            for k in RECALL_KS:
                hits[k].append(recall_at_k(ids, it.relevant, k))
            by_hops.setdefault(str(it.hops), []).append(hits[max(RECALL_KS)][-1])
    out = {f"recall_at_{k}": round(sum(v) / len(v), 6) if v else None for k, v in hits.items()}
    out["questions"] = len(rows)
    out["recall_at_5_by_hops"] = {h: round(sum(v) / len(v), 6) for h, v in sorted(by_hops.items())}
    return out


def _same_identity(index, identity: dict) -> bool:
    from clara_jax.index.index import IDENTITY_FIELDS

    return all(index.identity.get(f) == identity.get(f) for f in IDENTITY_FIELDS)


def pipeline_for(model, data_dir: Path, index_dir: Path, reuse, batch_size: int):
    """A RagPipeline over a loaded model (LoadedModel). Its index is `reuse` when that was built
    by the same compressor (identity), else the index at `index_dir` (built when missing).
    Returns (pipeline, whether `reuse` was reused)."""
    from clara_jax.index import model_identity, open_index
    from clara_jax.infer.rag import RagPipeline, RagSettings
    from projects.demo.run import _build_index

    ident = model_identity(model.cfg, model.params)
    shared = reuse is not None and _same_identity(reuse, ident)
    if shared:
        index = reuse
    else:
        _build_index(None, data_dir, index_dir, model=model)
        index = open_index(index_dir, identity=ident)
    settings = RagSettings(num_docs=int(model.config.data.num_docs),
                           max_new_tokens=int(model.config.data.answer_max_len),
                           batch_size=batch_size)
    return RagPipeline(model.config, model.cfg, model.params, model.tokenizer, index,
                       settings), shared


def row_of(name: str, summary: dict) -> dict:
    """One table row from an evaluation summary: overall, single-hop and two-hop EM/F1."""
    hops = summary.get("by_hops", {})

    def part(h, key):
        v = hops.get(h, {}).get(key)
        return None if v is None else round(float(v), 6)

    return {"row": name, "mode": summary["mode"], "questions": summary["questions"],
            "em": summary["em"], "f1": summary["f1"],
            "single_hop_em": part("1", "em"), "single_hop_f1": part("1", "f1"),
            "single_hop_questions": hops.get("1", {}).get("questions", 0),
            "two_hop_em": part("2", "em"), "two_hop_f1": part("2", "f1"),
            "two_hop_questions": hops.get("2", {}).get("questions", 0),
            "recall_at_5": summary.get("recall_at_5"),
            "ms_per_answer": summary["ms_per_answer"]}


def paired_rows(preds: dict, rates: list[int], baseline_rate: int) -> list[dict]:
    """Latent RAG at each rate against closed book and text RAG (both at the baseline rate) on
    the same questions: `report.paired_em` (questions only one side answers exactly, and the
    two-sided exact sign test). preds: {(rate, mode): per-question records}."""
    from clara_jax.eval.report import paired_em

    out = []
    for rate in rates:
        row = {"rate": rate}
        for base in ("closed_book", "text"):
            row[base] = paired_em({"latent": preds[rate, "latent"],
                                   base: preds[baseline_rate, base]}, "latent", base)
        out.append(row)
    return out


def _cell(v, pct: bool = True) -> str:
    if v is None:
        return "–"
    return f"{100 * v:.1f}" if pct else f"{v:.1f}"


def markdown(result: dict) -> str:
    """The quality table (scores in %) and the retriever table."""
    head = ("| | EM | F1 | single-hop EM | single-hop F1 | two-hop EM | two-hop F1 | Recall@5 "
            "| ms / answer |")
    lines = [head, "| --- " * (head.count("|") - 1) + "|"]
    for r in result["rows"]:
        lines.append(f"| {r['row']} | {_cell(r['em'])} | {_cell(r['f1'])} | "
                     f"{_cell(r['single_hop_em'])} | {_cell(r['single_hop_f1'])} | "
                     f"{_cell(r['two_hop_em'])} | {_cell(r['two_hop_f1'])} | "
                     f"{_cell(r['recall_at_5'])} | {_cell(r['ms_per_answer'], False)} |")
    q = result["rows"][0]
    lines += ["", f"Held-out world ({result['world']}), {q['questions']} questions "
              f"({q['single_hop_questions']} single-hop, {q['two_hop_questions']} two-hop); "
              f"scores in %; steps per stage {tuple(result['steps'])}; stage 1 from: " +
              ", ".join(f"{r}x the {v}" for r, v in result.get("starts", {}).items()) + ".", ""]
    lines += ["Paired with the baselines on the same questions: questions only one side "
              "answers exactly, and the two-sided exact sign test on those:", "",
              "| | only latent / only closed book | p | only latent / only text RAG | p |",
              "| --- | --- | --- | --- | --- |"]
    for r in result["paired"]:
        c, t = r["closed_book"], r["text"]
        lines.append(f"| latent RAG {r['rate']}x | {c['only_latent_rag']} / "
                     f"{c['only_closed_book']} | {c['sign_test_p']:.2g} | "
                     f"{t['only_latent_rag']} / {t['only_text_rag']} | "
                     f"{t['sign_test_p']:.2g} |")
    lines.append("")
    rr = result["retrievers"]
    lines += [f"Retrieval alone at {rr['rate']}x ({rr['questions']} questions with mapped gold "
              "documents):", "",
              "| retriever | Recall@1 | Recall@3 | Recall@5 |", "| --- | --- | --- | --- |"]
    for r in rr["rows"]:
        lines.append(f"| {r['retriever']} | {_cell(r['recall_at_1'])} | "
                     f"{_cell(r['recall_at_3'])} | {_cell(r['recall_at_5'])} |")
    lines += ["", "Does the generator read the latents? Stage-2 checkpoint, held-out stage-2 "
              "examples, teacher-forced answer cross-entropy (bench/latent_usage.py):", "",
              "| rate | right documents' latents | another question's | zeros | exact answers "
              "(right / another) |", "| --- | --- | --- | --- | --- |"]
    for rate, u in result["latent_usage"].items():
        lines.append(f"| {rate}x | {u['true']['answer_ce']:.3f} | {u['other']['answer_ce']:.3f} "
                     f"| {u['zeros']['answer_ce']:.3f} | {_cell(u['true']['answer_exact'])} / "
                     f"{_cell(u['other']['answer_exact'])} |")
    lines += ["", f"Command: `{result['command']}`; total {result['total_seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/demo.py")
    ap.add_argument("--workdir", default="runs/quality")
    ap.add_argument("--rates", default="4,16,64", help="data.compression_rate values")
    ap.add_argument("--steps", default="600,300,150", help="steps of stages 1,2,3")
    ap.add_argument("--questions", type=int, default=400, help="held-out questions evaluated")
    ap.add_argument("--world", choices=WORLD_SIZES, default=None,
                    help="default: config.demo.world_size (TRAIN/HELDOUT sizes allowed)")
    ap.add_argument("--baseline_rate", type=int, default=16)
    ap.add_argument("--warmup_steps", type=int, default=FALLBACK_WARMUP_STEPS,
                    help="language-model warm-up steps of the rates without a start of "
                         "their own")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, repeatable, e.g. train.batch_size=32")
    ap.add_argument("--progress", choices=("true", "false"), default="true")
    args = ap.parse_args(argv)

    from absl import logging as absl_logging

    from clara_jax.data.prepare import prepare_world
    from clara_jax.eval.job import evaluate, load_items
    from clara_jax.infer.serving import load_checkpoint_model
    from clara_jax.train.state import init_query_adapter
    from projects.demo.run import (
        _pretrained_tokenizer,
        _stage_config,
        _train_stage,
        _train_stages,
    )

    absl_logging.set_verbosity(absl_logging.WARNING)
    start = time.perf_counter()
    progress = args.progress == "true"
    rates = _ints(args.rates, "--rates")
    steps = _ints(args.steps, "--steps")
    if len(steps) != 3:
        raise SystemExit(f"--steps={args.steps!r}: expected three values (stages 1, 2, 3)")
    if args.baseline_rate not in rates:
        raise SystemExit(f"--baseline_rate={args.baseline_rate} is not among --rates={rates}")
    if args.questions <= 0:
        raise SystemExit(f"--questions={args.questions}: must be positive")
    base = load_config(args.config, args.set)
    base.demo.stage_steps = tuple(steps)
    world = args.world or str(base.demo.world_size)
    base.demo.world_size = world
    base = finalize(base)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    batch = int(base.demo.eval_batch_size)
    phases: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(name):
        t = time.perf_counter()
        yield
        phases[name] = round(time.perf_counter() - t, 2)

    rows, retrievers, usage, starts, preds = {}, None, {}, {}, {}
    for rate in rates:
        config = rate_config(base, rate, args.warmup_steps)
        m = int(config.model.num_memory_tokens)
        data_dir = workdir / "data" / f"m{m}"
        tokenizer = _pretrained_tokenizer(config, data_dir)
        if not (data_dir / "prepare.json").exists():
            with phase(f"data_m{m}"):
                prepare_world(data_dir, config, seed=int(config.demo.world_seed), size=world,
                              progress=progress, tokenizer=tokenizer)
            print(f"data: world ({world}) prepared for M={m} -> {data_dir}")
        config.train.data_dir = str(data_dir)
        rdir = workdir / f"rate{rate}"
        warm = int(config.demo.warmup_steps)
        starts[rate] = (f"pretrained {config.demo.pretrained}" if config.demo.pretrained
                        else f"{warm}-step warm-up" if warm else "scratch")
        print(f"== rate {rate}x (M={m}), from the {starts[rate]}")
        with phase(f"rate{rate}/train"):
            stage_dirs = _train_stages(config, rdir, data_dir, progress)
        with phase(f"rate{rate}/index"):
            model = load_checkpoint_model(stage_dirs[-1])
            pipe, _ = pipeline_for(model, data_dir, rdir / "index", None, batch)
        items, info = load_items(data_dir, pipe.index, limit=args.questions)
        modes = ["latent"] + (["closed_book", "text"] if rate == args.baseline_rate else [])
        summaries = {}
        for mode in modes:
            with phase(f"rate{rate}/eval_{mode}"):
                summaries[mode], preds[rate, mode] = evaluate(
                    pipe, items, mode, out_dir=rdir / "eval" / mode, progress=progress,
                    return_predictions=True)
                s = summaries[mode]
            print(f"rate {rate}x {mode}: EM {s['em']:.3f} F1 {s['f1']:.3f} "
                  f"R@5 {s['recall_at_5']} ({s['ms_per_answer']:.1f} ms/answer)")
        rows[f"latent RAG {rate}x"] = row_of(f"latent RAG {rate}x", summaries["latent"])
        with phase(f"rate{rate}/latent_usage"):
            usage[rate] = latent_usage().measure(stage_dirs[1], data_dir, stage=2, batches=8)
        if rate != args.baseline_rate:
            continue
        rows["closed book"] = row_of("closed book", summaries["closed_book"])
        text_row = f"text RAG ({rate}x retrieval)"
        rows[text_row] = row_of(text_row, summaries["text"])

        # Retrieval alone: the same questions, three query encoders.
        with phase("retrieval/stage3"):
            trained = retrieval_recall(pipe, items, batch)
        with phase("retrieval/stage2"):
            s2 = load_checkpoint_model(stage_dirs[1])
            s2.params = init_query_adapter(s2.params)
            s2_pipe, s2_shared = pipeline_for(s2, data_dir, rdir / "index_stage2", pipe.index,
                                              batch)
            keys = retrieval_recall(s2_pipe, items, batch)
        c3 = _stage_config(config, 3)
        c3.train.lambda_infonce = 1.0
        finalize(c3)
        with phase("retrieval/infonce_train"):
            nce_dir = _train_stage(c3, rdir / "stage3_infonce", data_dir, stage_dirs[1],
                                   progress)
        with phase("retrieval/infonce"):
            nce_pipe, nce_shared = pipeline_for(load_checkpoint_model(nce_dir), data_dir,
                                                rdir / "index_infonce", pipe.index, batch)
            nce = retrieval_recall(nce_pipe, items, batch)
        retrievers = {"rate": rate, "questions": trained["questions"], "rows": [
            {"retriever": "trained query reasoner (stage 3)", "checkpoint": str(stage_dirs[2]),
             "index_shared": True, **trained},
            {"retriever": "stage-2 compressor keys", "checkpoint": str(stage_dirs[1]),
             "index_shared": s2_shared, **keys},
            {"retriever": "supervised InfoNCE (stage 3, lambda_infonce=1)",
             "checkpoint": str(nce_dir), "index_shared": nce_shared, **nce}],
            "latent_eval_recall_at_5": summaries["latent"]["recall_at_5"],
            "eval_info": info}
        for r in retrievers["rows"]:
            print(f"retrieval {r['retriever']}: R@1 {r['recall_at_1']} R@3 {r['recall_at_3']} "
                  f"R@5 {r['recall_at_5']}")

    order = ["closed book", f"text RAG ({args.baseline_rate}x retrieval)"] + \
        [f"latent RAG {r}x" for r in rates]
    result = {
        "format": "clara_jax.quality_bench",
        "command": " ".join(["bench/quality.py", *(argv if argv is not None else sys.argv[1:])]),
        "config": args.config, "overrides": args.set, "world": world, "rates": rates,
        "baseline_rate": args.baseline_rate, "steps": steps, "questions": args.questions,
        "rows": [rows[name] for name in order], "retrievers": retrievers,
        "latent_usage": {str(r): usage[r] for r in rates},
        "paired": paired_rows(preds, rates, args.baseline_rate),
        "starts": {str(r): starts[r] for r in rates},
        "phases_seconds": phases, "total_seconds": round(time.perf_counter() - start, 1),
        "workdir": str(workdir),
    }
    md = markdown(result)
    atomic_write_json(workdir / "quality.json", result)
    atomic_write_text(workdir / "quality.md", md)
    print()
    print(md)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
