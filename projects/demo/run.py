"""The demo: the whole method on the bundled world, in one command (`make demo`):

    python -m projects.demo.run --config=configs/demo.py --workdir=W [--config.demo.X=...]

It:

1. builds the knowledge world (train and held-out), its tokenizer and datasets (W/data);
2. trains stage 1 -> 2 -> 3 (W/stage1..3, each starting from the previous stage), stage 1
   from the pretrained model of config.demo.pretrained (W/pretrained) or a language-model
   warm-up (W/warmup) when the config names one;
3. builds the ScaNN index of the held-out world's documents with the trained compressor;
4. answers held-out questions closed-book, with the documents' text (text RAG) and with their
   latents (CLaRa), and prints the table, three example questions and their documents;
5. writes W/results.json, W/losses.png, W/scores.png and per-mode predictions in W/eval/.

Steps already done (data built, stage finished, index present) are reused, so the command
can be re-run after an interruption. Per-stage steps: config.demo.stage_steps.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

from absl import app, flags, logging

from clara_jax.cli import set_quiet
from clara_jax.commands.common import check_config_args, define_config_flag, load_config
from clara_jax.data import world
from clara_jax.data.tokenizer import load_tokenizer
from clara_jax.eval import report
from clara_jax.fileio import atomic_write_json
from projects.demo.answer_swap import answer_swaps
from projects.demo.config import validate_demo

define_config_flag()
flags.DEFINE_string("workdir", None, "Directory for everything the demo makes.")
flags.DEFINE_bool("progress", True, "Show progress bars.")

MODES = ("closed_book", "text", "latent")


def _stage_config(config, stage: int):
    c = copy.deepcopy(config)
    c.train.stage = stage
    c.train.steps = int(config.demo.stage_steps[stage - 1])
    c.train.learning_rate = float(config.demo.stage_lr[stage - 1])
    # No pretrained decoder exists for the demo's small model: stages 1-2 train it too.
    c.train.train_base = stage < 3 and bool(config.demo.train_base)
    return c


def _train_stage(c, run: Path, data_dir: Path, init_from: Path | None = None,
                 progress: bool = True) -> Path:
    """Trains (or resumes, or skips when finished) stage `c.train.stage` into `run`."""
    from clara_jax.data.pipeline import make_loader
    from clara_jax.train.loop import train

    def loader_factory(cfg, stage, split):
        return make_loader(cfg, stage, data_dir, split=split,
                           augment=answer_swaps(float(cfg.demo.swap_answers)))

    stage = int(c.train.stage)
    start = time.perf_counter()
    result = train(c, run, loader_factory, init_from=str(init_from) if init_from else None,
                   progress=progress)
    if result.status != "done":
        raise SystemExit(f"stage {stage} stopped ({result.status}); re-run to resume")
    logged = report.read_metrics(run / "metrics.jsonl")
    loss = f"{logged[-1]['loss']:.3f}" if logged else "n/a"
    print(f"stage {stage}: {c.train.steps} steps, last logged loss {loss} "
          f"({time.perf_counter() - start:.0f}s)")
    return run


def _train_stages(config, workdir: Path, data_dir: Path, progress: bool = True) -> list[Path]:
    """Stages 1 -> 2 -> 3 into WORKDIR/stage{1,2,3}, each starting from the previous one; the
    language-model warm-up into WORKDIR/warmup first when config.demo.warmup_steps > 0."""
    dirs: list[Path] = []
    if config.demo.pretrained:
        from projects.demo.pretrain import write_start_state

        start = workdir / "pretrained"
        write_start_state(_stage_config(config, 1), config.demo.pretrained, start)
        dirs.append(start)
    elif int(config.demo.warmup_steps) > 0:
        from projects.demo.warmup import lm_warmup

        warm = workdir / "warmup"
        lm_warmup(_stage_config(config, 1), data_dir, warm, load_tokenizer(data_dir / "tokenizer"),
                  int(config.demo.warmup_steps), float(config.demo.warmup_lr), progress)
        dirs.append(warm)
    for stage in (1, 2, 3):
        dirs.append(_train_stage(_stage_config(config, stage), workdir / f"stage{stage}",
                                 data_dir, dirs[-1] if dirs else None, progress))
    return dirs[-3:]


def _build_index(checkpoint: Path, data_dir: Path, out: Path, model=None):
    """The held-out world's index at `out` (reused when finished), built with the compressor of
    `checkpoint` (or of an already loaded `model`, a LoadedModel)."""
    from clara_jax.index import build_index, open_index
    from clara_jax.index.corpus import make_tokenize, read_corpus
    from clara_jax.infer.serving import load_checkpoint_model

    if (out / "meta.json").exists():
        return open_index(out)
    model = model if model is not None else load_checkpoint_model(checkpoint)
    d = model.config.data
    records = list(read_corpus(data_dir / "heldout" / "corpus.jsonl", model.tokenizer,
                               int(d.doc_max_len), int(d.chunk_overlap)))
    return build_index(out, model.cfg, model.params, records,
                       make_tokenize(model.tokenizer, int(d.doc_max_len)), total=len(records))


def _examples(preds: dict[str, list[dict]], index, n: int = 3) -> str:
    lines = []
    latent = preds["latent"]
    # Prefer questions the latent mode got right, then the rest, for a readable sample.
    order = sorted(range(len(latent)), key=lambda i: -latent[i]["scores"]["f1"])[:n]
    for i in order:
        row = latent[i]
        lines.append(f"Q: {row['question']}")
        lines.append(f"   gold: {' | '.join(row['golds'])}")
        for mode in MODES:
            lines.append(f"   {mode:>11}: {preds[mode][i]['prediction']}")
        titles = [index.doc(d).get("title") or d for d in row["retrieved"][:row["used_docs"]]]
        lines.append(f"   latent docs: {'; '.join(titles)}")
    return "\n".join(lines)


def _pretrained_tokenizer(config, data_dir: Path):
    """The pretrained model's tokenizer (None without demo.pretrained). Data already built
    in the workdir with another tokenizer is refused: its ids would mean other words."""
    if not config.demo.pretrained:
        return None
    from projects.demo.pretrain import TOKENIZER_DIR, find_pretrained

    src = find_pretrained(config.demo.pretrained) / TOKENIZER_DIR
    built = data_dir / "tokenizer" / "tokenizer.model"
    if built.exists() and built.read_bytes() != (src / "tokenizer.model").read_bytes():
        raise SystemExit(f"projects.demo.run: {data_dir} was built with another tokenizer than "
                         f"{src}; use a new --workdir")
    return load_tokenizer(src)


def _question_types(config) -> dict[str, str]:
    """Held-out question text -> its type ("kind.attr", "kind.attr>attr" for two hops), from
    the demo's world, regenerated from its seed and size (the QA files carry no types)."""
    heldout = world.make_worlds(int(config.demo.world_seed), str(config.demo.world_size))
    return {q.question: q.qtype for q in heldout["heldout"].questions}


def main(argv) -> None:
    del argv
    from clara_jax.data.prepare import prepare_world
    from clara_jax.eval.job import evaluate, load_items, load_pipeline

    logging.set_verbosity(logging.WARNING)
    set_quiet(True)  # orbax's per-save lines, as the `clara` commands keep them
    fl = flags.FLAGS
    if not fl.workdir:
        raise flags.IllegalFlagValueError("--workdir is required")
    config = load_config()
    validate_demo(config)
    workdir = Path(fl.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    data_dir = workdir / "data"
    tokenizer = _pretrained_tokenizer(config, data_dir)
    if not (data_dir / "prepare.json").exists():
        summary = prepare_world(data_dir, config, seed=int(config.demo.world_seed),
                                size=str(config.demo.world_size), progress=fl.progress,
                                tokenizer=tokenizer)
        print(f"data: world, tokenizer and datasets in {summary['total_seconds']:.1f}s "
              f"-> {data_dir}")
    config.train.data_dir = str(data_dir)

    from clara_jax.train.checkpoint import CheckpointError
    from clara_jax.train.loop import NonFiniteLossError

    try:
        stage_dirs = _train_stages(config, workdir, data_dir, fl.progress)
    except (NonFiniteLossError, CheckpointError) as err:
        print(f"projects.demo.run: {err}", file=sys.stderr)
        sys.exit(1)
    t = time.perf_counter()
    index = _build_index(stage_dirs[-1], data_dir, workdir / "index")
    print(f"index: {index.num_docs} held-out documents ({time.perf_counter() - t:.1f}s)")

    pipe = load_pipeline(checkpoint=stage_dirs[-1], index=workdir / "index",
                         batch_size=int(config.demo.eval_batch_size))
    items, info = load_items(data_dir, pipe.index, limit=int(config.demo.eval_questions))
    summaries, preds = {}, {}
    for mode in MODES:
        summaries[mode], preds[mode] = evaluate(
            pipe, items, mode, out_dir=workdir / "eval" / mode, progress=fl.progress,
            return_predictions=True)
    results = report.results_json(summaries)
    # Is latent RAG's lead over each baseline more than chance? (paired, same questions)
    results["latent_rag_vs"] = {report.MODE_KEYS[b]: report.paired_em(preds, "latent", b)
                                for b in ("closed_book", "text")}
    results["by_question"] = report.em_by_question_type(preds, _question_types(config))
    results["questions"] = info["rows"]
    results["seconds"] = round(time.perf_counter() - start, 1)
    atomic_write_json(workdir / "results.json", results)
    report.plot_losses(stage_dirs, workdir / "losses.png")
    report.plot_scores(results, workdir / "scores.png")

    print()
    print(f"Held-out world, {info['rows']} questions never seen in training:")
    print(report.table(results))
    print()
    print("Exact match by question type (n = questions):")
    print(report.type_table(results["by_question"]))
    for key, c in results["latent_rag_vs"].items():
        print(f"latent_rag vs {key}: only latent_rag exact on {c['only_latent_rag']} questions, "
              f"only {key} on {c['only_' + key]} (exact sign test p = {c['sign_test_p']:.3g})")
    print()
    print(_examples(preds, pipe.index))
    print()
    print(f"results: {workdir / 'results.json'}; plots: {workdir / 'losses.png'}, "
          f"{workdir / 'scores.png'}; total {results['seconds']:.0f}s")
    print(json.dumps(results))


if __name__ == "__main__":
    sys.argv[1:] = check_config_args(sys.argv[1:])  # --config's path, the override names
    app.run(main)
