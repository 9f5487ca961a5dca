"""`clara ask --checkpoint=DIR --index=IDX "question" ...` or `... --file=Q.jsonl`, or
`clara ask --bundle=BUNDLE "question"` (a `clara export` bundle with its own index): answers
questions with the RAG pipeline (clara_jax.infer.rag) and prints one JSON object per answer
(JSONL) to stdout or --out: question, answer, mode, doc_ids, scores, entropy, refined (and the
documents' audit text with --show_docs). A summary (questions, refined rows, seconds) goes to
stderr.

Q.jsonl: one object per line with a string field "question" and optionally "id" (copied to the
answer). Exit status 2 on bad input, with the file, line and field named.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from absl import flags
from tqdm.auto import tqdm

from clara_jax.commands.common import define_output_flags, define_positive_integer
from clara_jax.commands.rag_common import (
    InputError,
    build_pipeline,
    check_out,
    define_answer_flags,
    define_pipeline_flags,
    exit_on_bad_input,
)
from clara_jax.fileio import atomic_write_text

define_pipeline_flags()
define_answer_flags()
flags.DEFINE_string("file", None, "JSONL file of questions ({'question', 'id'?} per line).")
flags.DEFINE_string("out", None, "Write the answers' JSONL here (default stdout).")
flags.DEFINE_float("refine_threshold", None,
                   "Adaptive refinement: answer again with --refine_docs more documents when the "
                   "mean entropy (nats) of the first --refine_tokens answer tokens exceeds this.")
define_positive_integer("refine_docs", 5, "Documents added on refinement.")
define_positive_integer("refine_tokens", 4, "First answer tokens whose entropy is tested.")
flags.DEFINE_bool("show_docs", False, "Include the supporting documents' audit text.")
define_output_flags(overwrite="Replace an existing --out file.",
                    progress="Show a progress bar for --file.")


def read_questions(path: str) -> list[dict]:
    """Q.jsonl -> [{'question': str, 'id'?: any}]; InputError names the file, line and field."""
    out = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise InputError(f"{path}: {e.strerror}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{n}: invalid JSON: {e.msg}") from None
        if not isinstance(row, dict):
            raise InputError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        q = row.get("question")
        if not isinstance(q, str) or not q.strip():
            raise InputError(f"{path}:{n}: field 'question': must be a non-empty string")
        out.append({"question": q, **({"id": row["id"]} if "id" in row else {})})
    if not out:
        raise InputError(f"{path}: no questions")
    return out


def warn_long_questions(questions: list[str], pipeline) -> None:
    """Says on stderr how many questions are longer than the model reads (they are cut to
    data.question_max_len tokens, the length it was trained with)."""
    qmax = pipeline.question_max_len
    long = sum(len(ids) > qmax for ids in pipeline.tok.encode_batch(questions))
    if long:
        print(f"warning: {long} of {len(questions)} questions are longer than "
              f"data.question_max_len={qmax} tokens and are cut to it (the checkpoint's "
              "length; a longer one needs training with a larger --config.data."
              "question_max_len)", file=sys.stderr)


def main(argv) -> None:
    import jax


    fl = flags.FLAGS
    with exit_on_bad_input("ask"):
        if fl.file and len(argv) > 1:
            raise InputError("give questions as arguments or --file, not both")
        rows = (read_questions(fl.file) if fl.file
                else [{"question": q} for q in argv[1:]])
        if not rows:
            raise InputError('no question: clara ask --checkpoint=DIR --index=IDX "question" '
                             "(or --file=Q.jsonl)")
        for i, r in enumerate(rows, 1):
            if not r["question"].strip():
                raise InputError(f"question {i} is empty")
        check_out(fl.out, fl.overwrite, directory=False)
        start = time.perf_counter()

        settings = dict(mode=fl.mode, refine_threshold=fl.refine_threshold,
                        refine_docs=fl.refine_docs, refine_tokens=fl.refine_tokens)
        # Unset: the config's data.num_docs / data.answer_max_len (serving.load_pipeline).
        settings.update({name: getattr(fl, name) for name in ("num_docs", "max_new_tokens")
                         if getattr(fl, name)})
        pipeline = build_pipeline(fl, fl.mode != "closed_book", settings)
        warn_long_questions([r["question"] for r in rows], pipeline)
        lines, refined = [], 0
        step = fl.batch_size
        bar = tqdm(total=len(rows), unit="q", desc="ask", disable=not (fl.progress and fl.file),
                   dynamic_ncols=True)
        for b, lo in enumerate(range(0, len(rows), step)):
            chunk = rows[lo:lo + step]
            answers, stats = pipeline.answer([r["question"] for r in chunk],
                                             rng=jax.random.fold_in(jax.random.key(fl.seed), b))
            refined += stats["refined"]
            for r, a in zip(chunk, answers):
                out = ({"id": r["id"]} if "id" in r else {}) | a.to_json()
                if fl.show_docs:
                    out["docs"] = [pipeline.index.doc(d) for d in a.doc_ids]
                lines.append(json.dumps(out, ensure_ascii=False))
            bar.update(len(chunk))
        bar.close()
    if fl.out:
        atomic_write_text(fl.out, "".join(line + "\n" for line in lines))
    else:
        for line in lines:
            print(line)
    print(json.dumps({"questions": len(rows), "refined": refined, "mode": fl.mode,
                      "seconds": round(time.perf_counter() - start, 3),
                      "mesh": {k: int(v) for k, v in pipeline.mesh.shape.items()}}),
          file=sys.stderr)

