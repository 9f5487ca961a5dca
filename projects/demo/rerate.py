"""A pretrained start made for one compression rate, turned into the start of another.

    python -m projects.demo.rerate --config=configs/demo.py --start=projects/demo/start \
        --rate=4 --out=OUT

The start's tokenizer reserves one `<MEM i>` symbol per memory token and its params hold one
memory embedding per token, so a start serves only its own M (`check_tokenizer_fits`). This
writes OUT in the pretrained-directory format (`projects.demo.pretrain`: OUT/params.safetensors
in float32, OUT/tokenizer/, plus OUT/rerate.json), for M' = data.doc_max_len // rate:

  * the tokenizer: `SentencePieceTokenizer.with_memory_tokens(M')`, every text id unchanged;
  * memory embedding j' of M' = the old one whose span holds the end of j''s span (memory
    token j sits at the end of the j-th of M equal spans, `spread_memory_positions`), so each
    new slot starts as the old slot that read the same stretch of text;
  * rows of new ids (M' > M: the appended `<MEM i>`, never an input or a target, since memory
    tokens are injected embeddings) = the rows of the last old memory symbol, a symbol that
    pretraining has likewise never seen as an input or a target;
  * the options shaped by the rate (span head, chunk write, the copy path's sub-position codes)
    are dropped: `load_params` draws them fresh when a config asks for them.

Every other weight is kept. The result is a start to continue pretraining from at the new rate
(`python -m projects.demo.run_pretrain --init_params=OUT/params.safetensors
--tokenizer=OUT/tokenizer --config.data.compression_rate=R`, plus
`--config.model.vocab_size=V` when the tokenizer grew past the config's vocabulary: V is
rerate.json's vocab_size), not a model for the rate yet.
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import numpy as np
from absl import app, flags

from clara_jax import param_store
from clara_jax.commands.common import check_config_args, define_config_flag, load_config
from clara_jax.config import finalize
from clara_jax.data.tokenizer import SentencePieceTokenizer, TokenizerError, load_tokenizer
from clara_jax.fileio import atomic_write_json
from projects.demo.pretrain import PARAMS_FILE, TOKENIZER_DIR, find_pretrained

RATE_SHAPED = ("span_head", "chunk_write", "copy_subpos")
VOCAB_ROWS = (("decoder/embedding", 0), ("decoder/unembed", 1))  # (param, its vocab axis)


def memory_rows(m_old: int, m_new: int) -> np.ndarray:
    """int[M'] -> for each new memory token, the old token whose span holds its span's end."""
    return np.array([math.ceil((j + 1) * m_old / m_new) - 1 for j in range(m_new)])


def rerate_params(flat: dict, old_mem_ids: list[int], new_mem_ids: list[int]) -> dict:
    """A flat params dict (param_store names) made for the memory tokens `old_mem_ids` (M of
    them), made for `new_mem_ids` (M', the re-rated tokenizer's) as the module docstring says.
    memory_embeddings: [M, D] -> [M', D]; embedding [V, D] / unembed [D, V] grow to
    max(V, max(new_mem_ids) + 1) rows."""
    out = {k: v for k, v in flat.items() if k not in RATE_SHAPED}
    memory = np.asarray(flat["memory_embeddings"])
    if memory.shape[0] != len(old_mem_ids):
        raise ValueError(f"memory_embeddings has {memory.shape[0]} rows but the tokenizer has "
                         f"{len(old_mem_ids)} memory tokens")
    out["memory_embeddings"] = memory[memory_rows(len(old_mem_ids), len(new_mem_ids))]
    fresh = [i for i in new_mem_ids if i not in old_mem_ids]
    for name, axis in VOCAB_ROWS:
        if name not in flat:
            continue
        table = np.moveaxis(np.asarray(flat[name]), axis, 0)
        rows = max(table.shape[0], max(new_mem_ids) + 1)
        grown = np.concatenate([table, np.zeros((rows - table.shape[0], *table.shape[1:]),
                                                table.dtype)])
        grown[fresh] = table[old_mem_ids[-1]]
        out[name] = np.moveaxis(grown, 0, axis)
    return out


def rerate(start, rate: int, doc_max_len: int, out) -> dict:
    """Writes OUT (module docstring) from the pretrained directory `start`; returns what
    OUT/rerate.json records."""
    src = find_pretrained(start)
    tok = load_tokenizer(src / TOKENIZER_DIR)
    if not isinstance(tok, SentencePieceTokenizer):
        raise TokenizerError(f"{src / TOKENIZER_DIR}: re-rating needs a SentencePiece "
                             f"tokenizer, this one is {tok.kind}")
    if rate <= 0 or doc_max_len % rate:
        raise ValueError(f"rate {rate} does not divide data.doc_max_len={doc_max_len}")
    m_new = doc_max_len // rate
    new_tok = tok.with_memory_tokens(m_new)
    old = param_store.load_safetensors(src / PARAMS_FILE)
    flat = rerate_params(old, tok.mem_ids, new_tok.mem_ids)
    out = Path(out)
    new_tok.save(out / TOKENIZER_DIR)
    param_store.save_safetensors(flat, out / PARAMS_FILE)
    info = {"start": str(src), "doc_max_len": doc_max_len,
            "rate_from": doc_max_len // tok.num_memory_tokens, "rate": rate,
            "num_memory_tokens_from": tok.num_memory_tokens, "num_memory_tokens": m_new,
            "vocab_size_from": tok.vocab_size, "vocab_size": new_tok.vocab_size,
            "memory_rows": memory_rows(tok.num_memory_tokens, m_new).tolist(),
            "dropped": sorted(k for k in RATE_SHAPED if k in old)}
    atomic_write_json(out / "rerate.json", info)
    return info


# Model options a start may have been made without, each with the param that says it was
# made with it.
OPTION_PARAMS = (("span_head", "span_head"), ("chunk_write", "chunk_write"),
                 ("latent_copy", "copy_query"), ("copy_content", "copy_content_key"))


def config_at_rate(config, rate: int, start):
    """`config` at data.compression_rate=`rate` for the pretrained directory `start` made for
    it, finalized again so that M is recomputed: model.vocab_size = the start's embedding rows
    (its tokenizer's ids, appended memory symbols included), and the options of OPTION_PARAMS
    that the start was made without turned off (with them train.pointer_weight), so that a
    start without the copy path (projects/demo/start_16x) runs as it was pretrained rather
    than with fresh draws of those parts."""
    from safetensors import safe_open

    c = copy.deepcopy(config)
    c.data.compression_rate = int(rate)
    with safe_open(str(find_pretrained(start) / PARAMS_FILE), "np") as f:
        names = set(f.keys())
        c.model.vocab_size = int(f.get_slice("decoder/embedding").get_shape()[0])
    for option, param in OPTION_PARAMS:
        if param not in names:
            c.model[option] = False
    if not c.model.latent_copy:
        c.train.pointer_weight = 0.0
    return finalize(c)


def main(argv) -> None:
    del argv
    fl = flags.FLAGS
    info = rerate(fl.start, fl.rate, int(load_config().data.doc_max_len), fl.out)
    print(info)


if __name__ == "__main__":
    # Flags only when run: the library's commands, imported beside this module in one process
    # (the test suite), define --out too.
    define_config_flag()
    flags.DEFINE_string("start", None, "Pretrained directory to re-rate.")
    flags.DEFINE_integer("rate", None, "The new data.compression_rate.")
    flags.DEFINE_string("out", None, "Output directory.")
    flags.mark_flags_as_required(["start", "rate", "out"])
    sys.argv[1:] = check_config_args(sys.argv[1:])
    app.run(main)
