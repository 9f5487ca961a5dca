"""Are a question's answer tokens written in its document's latents? The span read-out
(`model.latent_span_logits`: the span head with `model.span_head`, else the fixed permuted
read-out of the span loss) of the pretraining evaluation world's stage-1 QA documents
(projects.demo.pretrain.eval_batches, never trained on), scored at every document token and at
the document positions that hold the answer (its token sequence found in the document).

`python -m projects.demo.probe_answer_readout --config=configs/demo.py --params=P.safetensors
[--config.model.span_head=true ...]` prints one JSON line: token accuracy over all document
tokens, over the answer's tokens, and the share of answers read out whole. The copy path
(`model.latent_copy`) can copy only what this read-out gives; with it on, the line also
holds `copy_path`: where its pointer looks at the answer tokens (`pointer_stats`).
"""

from __future__ import annotations

import json
import sys

import numpy as np
from absl import app, flags

from clara_jax.commands.common import check_config_args, define_config_flag, load_config


def answer_positions(doc: np.ndarray, answer: np.ndarray) -> np.ndarray | None:
    """Where the token sequence `answer` int[A] first occurs in `doc` int[Td]: int[A], or
    None when it does not occur (the answer is worded otherwise in the document)."""
    a = len(answer)
    for i in range(len(doc) - a + 1):
        if np.array_equal(doc[i:i + a], answer):
            return np.arange(i, i + a)
    return None


def score_guesses(guesses: list[np.ndarray], batches) -> dict:
    """{token_accuracy, answer_token_accuracy, answers_whole, answers_found, rows}: guesses
    int[B, Td] per stage-1 batch (doc_tokens int32[B, 1, Td], targets/loss_mask [B, T]) of
    each document token."""
    right = valid = ans_right = ans_total = whole = found = rows = 0
    for got, b in zip(guesses, batches, strict=True):
        docs, mask = np.asarray(b["doc_tokens"][:, 0]), np.asarray(b["doc_mask"][:, 0])
        hit = (got == docs) & mask
        right, valid = right + int(hit.sum()), valid + int(mask.sum())
        for i in range(len(docs)):
            rows += 1
            answer = np.asarray(b["targets"][i])[np.asarray(b["loss_mask"][i])]
            # The answer without its end token; documents are right-padded, so positions in
            # the valid tokens are positions in the row.
            where = answer_positions(docs[i][mask[i]], answer[:-1])
            if where is None or len(where) == 0:
                continue
            found += 1
            ans_right += int(hit[i, where].sum())
            ans_total += len(where)
            whole += int(hit[i, where].all())
    return {"token_accuracy": round(right / max(valid, 1), 4),
            "answer_token_accuracy": round(ans_right / max(ans_total, 1), 4),
            "answers_whole": round(whole / max(found, 1), 4),
            "answers_found": found, "rows": rows}


def readout_guesses(cfg, params, batches) -> list[np.ndarray]:
    """The span read-out's argmax int[B, Td] of each stage-1 batch's documents."""
    import jax

    from clara_jax.model import compress_docs, latent_span_logits

    @jax.jit
    def guess(params, doc_tokens, doc_mask):
        latents = compress_docs(cfg, params, doc_tokens, doc_mask)[:, 0]
        rate = doc_tokens.shape[-1] // cfg.num_memory_tokens
        logits = latent_span_logits(cfg, params, latents, rate)
        return logits.reshape(logits.shape[0], -1, logits.shape[-1]).argmax(-1)

    return [np.asarray(guess(params, b["doc_tokens"], b["doc_mask"])) for b in batches]


def generator_states(cfg, params, batch):
    """A stage-1 batch teacher-forced through the generator (traceable) -> (latents
    float[B, 1, M, L], the decoder's logits float32[B, T, V] before the copy path, its final
    states float[B, T, D], the prompt's RoPE positions int32[B, T])."""
    import jax.numpy as jnp

    from clara_jax.model import compress_docs
    from clara_jax.model.clara import CLaRa
    from clara_jax.model.decoder import Decoder, rope_positions

    latents = compress_docs(cfg, params, batch["doc_tokens"], batch["doc_mask"])
    _, captured = CLaRa(cfg).apply(
        {"params": params}, batch["tokens"], batch["mask"], batch["slot_mask"], latents,
        method=CLaRa.generate, capture_intermediates=lambda m, _: isinstance(m, Decoder))
    logits, hidden, _ = captured["intermediates"]["decoder"]["__call__"][0]
    positions, _ = rope_positions(batch["mask"], jnp.zeros((latents.shape[0],), jnp.int32),
                                  batch["slot_mask"], cfg.latent_span)
    return latents, logits, hidden, positions


def sources_at_targets(probs, targets):
    """Each source's read-out probability of each target: probs float32[B, S, V], targets
    int32[B, T] -> float32[B, S, T] (traceable)."""
    import jax.numpy as jnp

    index = jnp.broadcast_to(targets[:, None], probs.shape[:2] + targets.shape[1:])
    return jnp.take_along_axis(probs, index, -1)


def pointer_stats(cfg, params, batches) -> dict:
    """The copy path at the answer tokens (model.latent_copy), teacher-forced on the same
    stage-1 rows with their own documents' latents: the mean gate; the share of answer tokens
    some (latent, sub-position) source's read-out argmax equals (`source_exists`); the
    pointer's attention mass on such sources, there; and the target's probability under the
    copied distribution, the generator's own softmax and their mix (what training sees); and
    the copy path's ceiling on these latents: the target's probability at its best source (a
    pointer that put all its mass there), the share of answer tokens where that beats the
    generator, and the mix under that pointer and a gate that picks the better of the two."""
    import jax
    import jax.numpy as jnp

    from clara_jax.model.clara import CLaRa

    model = CLaRa(cfg)

    @jax.jit
    def stats(params, batch):
        latents, logits, hidden, positions = generator_states(cfg, params, batch)
        variables = {"params": params}
        keys, probs = model.apply(variables, latents, positions, batch["slot_mask"],
                                  method=CLaRa.copy_memory)
        weights, gate = model.apply(variables, hidden, positions, keys,
                                    method=CLaRa.copy_pointer)
        target = batch["targets"][..., None]
        is_source = probs.argmax(-1)[:, None, :] == target  # [B, T, S]
        copied = jnp.take_along_axis(jnp.einsum("bts,bsv->btv", weights, probs), target,
                                     -1)[..., 0]
        own = jnp.take_along_axis(jax.nn.softmax(logits, -1), target, -1)[..., 0]
        g = gate[..., 0]
        best = sources_at_targets(probs, batch["targets"]).max(1)
        return {"gate": g, "source_exists": is_source.any(-1),
                "pointer_mass": jnp.sum(weights * is_source, -1), "p_copied": copied,
                "p_generator": own, "p_mixed": (1 - g) * own + g * copied,
                "p_best_source": best, "best_source_beats_generator": best > own,
                "p_oracle_mix": jnp.maximum(best, own)}

    sums, n, mass_there = {}, 0, 0.0
    for batch in batches:
        out = jax.tree.map(np.asarray, stats(params, batch))
        at = np.asarray(batch["loss_mask"])
        n += int(at.sum())
        mass_there += float(out["pointer_mass"][at & out["source_exists"]].sum())
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v[at].sum())
    means = {k: round(v / max(n, 1), 4) for k, v in sums.items() if k != "pointer_mass"}
    return {"answer_tokens": n, **means,
            "pointer_mass_where_a_source_exists": round(
                mass_there / max(sums["source_exists"], 1), 4)}


def main(argv) -> None:
    del argv
    from clara_jax.data.tokenizer import load_tokenizer
    from clara_jax.model import ModelConfig
    from projects.demo import pretrain

    config = load_config()
    cfg = ModelConfig.from_config(config)
    tok = load_tokenizer(flags.FLAGS.tokenizer)
    c = pretrain.pretrain_config(config, 32, 1e-3, 0.0, 1)
    batches = pretrain.eval_batches(tok, {1: pretrain.featurizer_fields(tok, c, 1)}, 32)[1]
    params = pretrain.load_params(flags.FLAGS.params, cfg)
    scores = score_guesses(readout_guesses(cfg, params, batches), batches)
    if cfg.latent_copy:
        scores["copy_path"] = pointer_stats(cfg, params, batches)
    print(json.dumps({"params": flags.FLAGS.params, **scores}))


if __name__ == "__main__":
    # Flags only when run: the tests import this module beside commands with flags of these names.
    define_config_flag()
    flags.DEFINE_string("params", None, "A params.safetensors (projects.demo.pretrain's output).")
    flags.DEFINE_string("tokenizer", "projects/demo/start/tokenizer", "The model's tokenizer.")
    sys.argv[1:] = check_config_args(sys.argv[1:])
    app.run(main)
