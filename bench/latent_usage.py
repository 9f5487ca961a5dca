"""Does the generator read the latents? Teacher-forced answer loss with the right documents'
latents against the same with another question's latents.

    .venv/bin/python bench/latent_usage.py --checkpoint runs/demo/stage2 --data runs/demo/data
        [--stage 2] [--split heldout] [--batches 8]

Feeds `--batches` batches of the stage's held-out examples (stage 1: one document and a QA or
paraphrase target; stage 2: K documents, gold among them) through the checkpoint and, for the
same answers, compares three ways of filling the generator's latent slots:
  true:   the example's own documents, compressed by the checkpoint's compressor;
  other:  the documents of the next example in the batch (a different question);
  zeros:  all-zero latents.
If answers are read from the latents, `true` has a clearly lower loss and higher answer
accuracy than `other`; if they are equal the generator answers from the question alone (its
answer prior), whatever the retriever finds. Reported: answer cross-entropy per token, the
exact-match rate of the teacher-forced argmax over whole answers, and the first answer token's
accuracy, per filling; for stage 1 also apart for QA pairs and paraphrases (`by_kind`); and the
loss gain and exact answers per question type of the bundled world (`by_question_type`,
`clara_jax.data.world.question_type`: which relations the generator reads and which it answers
from its prior). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from clara_jax.model import compress_docs, generate_logits  # noqa: E402

FILLINGS = ("true", "other", "zeros")
FIELDS = ("doc_tokens", "doc_mask", "tokens", "mask", "slot_mask", "targets", "loss_mask")


def make_scorer(cfg):
    """score(params, batch) -> {filling: float32[3, B]} rows (per-example answer CE summed over
    target tokens, whole-answer argmax match, first-answer-token match), target counts int[B]."""

    def per_example(logits, batch):
        logits = logits.astype(jnp.float32)
        logz = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
        w = batch["loss_mask"].astype(jnp.float32)
        ce = jnp.sum((logz - picked) * w, axis=-1)
        right = jnp.argmax(logits, axis=-1) == batch["targets"]
        exact = jnp.all(right | ~batch["loss_mask"], axis=-1)
        first = jnp.argmax(batch["loss_mask"], axis=-1)
        first_ok = jnp.take_along_axis(right, first[:, None], axis=-1)[:, 0]
        return jnp.stack([ce, exact.astype(jnp.float32), first_ok.astype(jnp.float32)])

    @jax.jit
    def score(params, batch):
        lat = compress_docs(cfg, params, batch["doc_tokens"], batch["doc_mask"])
        fills = {"true": lat, "other": jnp.roll(lat, 1, axis=0), "zeros": jnp.zeros_like(lat)}
        out = {}
        for name, latents in fills.items():
            logits, _ = generate_logits(cfg, params, batch["tokens"], batch["mask"],
                                        batch["slot_mask"], latents)
            out[name] = per_example(logits, batch)
        return out, jnp.sum(batch["loss_mask"], axis=-1)

    return score


def measure(checkpoint, data_dir, stage: int = 2, split: str = "heldout",
            batches: int = 8) -> dict:
    from clara_jax.data.pipeline import make_loader
    from clara_jax.data.world import question_type
    from clara_jax.infer.serving import load_checkpoint_model

    model = load_checkpoint_model(checkpoint)
    score = make_scorer(model.cfg)
    loader = iter(make_loader(model.config, stage, data_dir, split=split))
    # Stage-1 rows are QA pairs (pos_index 0) or paraphrases (-1), reported apart as well.
    sums = defaultdict(lambda: {name: np.zeros(3) for name in FILLINGS})
    examples = defaultdict(int)
    tokens = defaultdict(float)
    for _ in range(batches):
        try:
            raw = next(loader)
        except StopIteration:
            break
        batch = {k: jnp.asarray(raw[k]) for k in FIELDS}
        rows, counts = score(model.params, batch)
        counts = np.asarray(counts)
        qa = np.asarray(raw["pos_index"]) >= 0
        masks = {"all": np.ones_like(qa), "qa": qa, "paraphrase": ~qa}
        # The question, read back from the query reasoner's input (<ENC> BOS question EOS).
        types = np.array([question_type(model.tokenizer.decode(t[m]))
                          for t, m in zip(np.asarray(raw["query_tokens"]),
                                          np.asarray(raw["query_mask"]))])
        for t in set(types[qa]):
            masks["type:" + t] = qa & (types == t)
        for g in masks:
            sel = masks[g]
            tokens[g] += float(counts[sel].sum())
            examples[g] += int(sel.sum())
            for name in FILLINGS:
                sums[g][name] += np.asarray(rows[name])[:, sel].sum(axis=1)
    if not examples["all"]:
        raise SystemExit(f"{data_dir}: no stage-{stage} {split} examples")

    def summary(g):
        out = {"examples": examples[g], "target_tokens": int(tokens[g])}
        for name in FILLINGS:
            s = sums[g][name]
            out[name] = {"answer_ce": round(s[0] / max(tokens[g], 1.0), 4),
                         "answer_exact": round(s[1] / max(examples[g], 1), 4),
                         "first_token_acc": round(s[2] / max(examples[g], 1), 4)}
        out["ce_gain_over_other"] = round(out["other"]["answer_ce"] - out["true"]["answer_ce"],
                                          4)
        return out

    out = {"checkpoint": str(checkpoint), "stage": stage, "split": split, **summary("all")}
    if stage == 1:
        out["by_kind"] = {g: summary(g) for g in ("qa", "paraphrase")}
    out["by_question_type"] = {}
    for g in sorted(sums):
        if g.startswith("type:"):
            s = summary(g)
            out["by_question_type"][g[len("type:"):]] = {
                "examples": s["examples"], "ce_gain_over_other": s["ce_gain_over_other"],
                "answer_exact_true": s["true"]["answer_exact"],
                "answer_exact_other": s["other"]["answer_exact"]}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="a training workdir (stage 1 or 2)")
    ap.add_argument("--data", required=True, help="prepared data directory (clara data)")
    ap.add_argument("--stage", type=int, choices=(1, 2), default=2)
    ap.add_argument("--split", default="heldout")
    ap.add_argument("--batches", type=int, default=8)
    args = ap.parse_args(argv)
    result = measure(args.checkpoint, args.data, args.stage, args.split, args.batches)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
