"""One call from nothing to loader-ready data: the bundled world, its tokenizer and all four
TFDS datasets in one directory (what `clara data world --build` and the demo use).

Layout of OUT:
  OUT/world.json, OUT/{train,heldout}/{corpus,stage1,stage2,stage3}.jsonl   (write_world)
  OUT/tokenizer/                                                          (SentencePiece)
  OUT/clara_{stage1,stage2,stage3,corpus}/ and their .summary.json        (build_dataset)
so that `make_loader(config, stage, OUT)` and `read_rows(fmt, OUT, split)` read it directly.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from clara_jax.data import tfds_build, world
from clara_jax.data.tokenizer import Tokenizer


def world_tokenizer(config, seed: int = 0, size: str = "small") -> Tokenizer:
    """The SentencePiece model for the bundled world and `config`. It is trained on the text of
    both worlds (documents, questions, paraphrases): subword statistics only, so held-out
    entity names are not split into single letters; no held-out fact is a training target."""
    worlds = world.make_worlds(seed, size)
    texts = []
    for w in worlds.values():
        texts += list(w.docs.values()) + list(w.paraphrases.values())
        texts += [q.question for q in w.questions]
    return tfds_build.train_tokenizer_for(list(dict.fromkeys(texts)), config)


def prepare_world(out, config, seed: int = 0, size: str = "small",
                  formats=("stage1", "stage2", "stage3", "corpus"), progress: bool = True,
                  tokenizer: Tokenizer | None = None) -> dict:
    """Writes the world files, its tokenizer and the TFDS datasets into OUT; returns a summary
    with rows per file, token statistics and timings. `progress`: TFDS's progress bars.
    `tokenizer`: use this one (a pretrained model's) instead of training one on the world."""
    out = Path(out)
    start = time.perf_counter()
    summary = {"world": world.write_world(out, seed, size)}
    summary["world_seconds"] = round(time.perf_counter() - start, 3)
    t = time.perf_counter()
    tok = tokenizer or world_tokenizer(config, seed, size)
    tok.save(out / tfds_build.TOKENIZER_DIR)
    summary["tokenizer"] = {"kind": tok.kind, "vocab_size": tok.vocab_size,
                            "trained": tokenizer is None,
                            "seconds": round(time.perf_counter() - t, 3)}
    summary["builds"] = {}
    for fmt in formats:
        inputs = {split: out / split / f"{fmt}.jsonl" for split in world.SPLITS}
        summary["builds"][fmt] = tfds_build.build_dataset(fmt, inputs, out, config, tok,
                                                          progress=progress)
    summary["total_seconds"] = round(time.perf_counter() - start, 3)
    (out / "prepare.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
