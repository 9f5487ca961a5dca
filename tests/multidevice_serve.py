"""Run with 8 simulated CPU devices: a checkpoint whose config.mesh is fsdp=2, tensor=2 (data
fills the rest: 2) served through clara_jax.infer.serving, from the run and from its bundle.
Prints one JSON line of facts for tests/test_serving.py to check: the serving mesh, how the
params and the jitted encoder's and generator's inputs and outputs are sharded, and whether
the answers equal those of the same model on one device.

Usage: XLA_FLAGS=--xla_force_host_platform_device_count=8 python multidevice_serve.py ROOT
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

assert "--xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from clara_jax.aot import sharding_mismatches  # noqa: E402
from clara_jax.data import prompts  # noqa: E402
from clara_jax.data.tokenizer import load_tokenizer  # noqa: E402
from clara_jax.eval.job import evaluate, load_items  # noqa: E402
from clara_jax.export.bundle import export_bundle  # noqa: E402
from clara_jax.infer.generation import GREEDY, generate_padded  # noqa: E402
from clara_jax.infer.serving import load_pipeline  # noqa: E402
from clara_jax.model import ModelConfig, init_params, logical_specs  # noqa: E402
from clara_jax.model.sharding import (  # noqa: E402
    batch_sharding,
    logical_to_shardings,
    make_mesh,
)
from tests import eval_support as es  # noqa: E402

MODES = ("latent", "text", "closed_book")
SETTINGS = dict(batch_size=8, backend="exact", max_new_tokens=6)


def _split_over_batch(arr, mesh) -> bool:
    """Whether `arr`'s leading axis is split over (data, fsdp) and the rest replicated."""
    return arr.sharding.is_equivalent_to(batch_sharding(mesh, arr.ndim), arr.ndim)


def _rows_per_device(arr) -> list[int]:
    return sorted({int(s.data.shape[0]) for s in arr.addressable_shards})


def _params_facts(pipeline) -> dict:
    mesh = pipeline.mesh
    want = logical_to_shardings(logical_specs(pipeline.cfg), mesh)
    leaves = jax.tree.leaves(pipeline.params)
    wanted = jax.tree.leaves(want)
    q = pipeline.params["decoder"]["layers_0"]["attn"]["q"]["kernel"]
    return {"mesh": {k: int(v) for k, v in mesh.shape.items()},
            "params_as_rules": all(p.sharding.is_equivalent_to(w, p.ndim)
                                   for p, w in zip(leaves, wanted)),
            "params_split": sum(not p.sharding.is_fully_replicated for p in leaves),
            "params_total": len(leaves),
            "q_kernel_shape": list(q.shape),
            "q_kernel_shard_shape": list(q.addressable_shards[0].data.shape)}


def _encoder_facts(pipeline, questions) -> dict:
    """The query encoder's compiled input / output shardings and one real call's output."""
    pipeline.query_latents(questions)  # builds the encoder
    enc = pipeline._encoder
    enc_rows = [prompts.encode_document(pipeline.tok, q, pipeline.question_max_len)[:2]
                for q in questions]
    pad = ((0, enc.batch_size - len(questions)), (0, 0))  # as LatentEncoder pads a call
    t = np.pad(np.stack([a for a, _ in enc_rows]), pad)
    m = np.pad(np.stack([b for _, b in enc_rows]), pad)
    compiled = enc._fn.lower(enc.params, t, m).compile()
    lat = enc._fn(enc.params, t, m)
    tok_in = compiled.input_shardings[0][1]
    return {"encode_batch": int(t.shape[0]),
            "encode_tokens_in_split": tok_in.is_equivalent_to(
                batch_sharding(pipeline.mesh, 2), 2),
            "encode_out_split": _split_over_batch(lat, pipeline.mesh),
            "encode_out_rows_per_device": _rows_per_device(lat)}


def _generate_facts(pipeline, questions) -> dict:
    """generate_padded called as Generator calls it on a mesh (batch put over (data, fsdp),
    params where the loader placed them): its compiled input shardings and real outputs."""
    gen = pipeline.generator()
    res = pipeline.retrieve(questions, pipeline.settings.num_docs)
    k = pipeline.settings.num_docs
    toks, slots = pipeline.prompts(questions, [r[:k] for r in res.ids], "latent")
    host = gen.pad(toks, slots, pipeline.doc_latents(res, k))
    args = [jax.device_put(a, batch_sharding(gen.mesh, a.ndim)) for a in host]
    call = (pipeline.cfg, gen.params, *args, jax.random.key(0), np.int32(gen.eos_id),
            np.int32(gen.pad_id), GREEDY.as_arrays())
    kw = dict(max_new_tokens=gen.max_new_tokens, adapter=gen.adapter)
    compiled = generate_padded.lower(*call, **kw).compile()
    # The check `clara compile` makes: each used param's compiled sharding is the rules' one.
    mismatches = sharding_mismatches(
        logical_to_shardings(logical_specs(pipeline.cfg), pipeline.mesh),
        compiled.input_shardings[0][0], gen.params, "params")
    out = generate_padded(*call, **kw)
    batch_in = compiled.input_shardings[0][1:5]
    return {"generate_batch": int(host[0].shape[0]),
            "generate_params_in_mismatches": mismatches,
            "generate_batch_in_split": all(
                s.is_equivalent_to(batch_sharding(pipeline.mesh, a.ndim), a.ndim)
                for s, a in zip(batch_in, host)),
            "generate_out_split": all(_split_over_batch(a, pipeline.mesh) for a in out),
            "generate_out_rows_per_device": _rows_per_device(out.tokens)}


def _answers(pipeline, questions) -> dict:
    out = {}
    for mode in MODES:
        answers, _ = pipeline.answer(questions, mode=mode)
        out[mode] = [{"tokens": a.tokens, "doc_ids": a.doc_ids, "scores": a.scores}
                     for a in answers]
    return out


def _same(a: dict, b: dict) -> bool:
    return all(
        x["tokens"] == y["tokens"] and x["doc_ids"] == y["doc_ids"]
        and np.allclose(x["scores"], y["scores"], atol=1e-4)
        for mode in MODES for x, y in zip(a[mode], b[mode]))


def main() -> None:
    root = Path(sys.argv[1])
    config = es.fresh_config(root / "world")
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 2, 2
    cfg = ModelConfig.from_config(config)
    world_dir = es.write_world(root, config)
    params = es.perturbed(init_params(cfg, jax.random.key(0)))
    es.save_checkpoint(config, params, root / "run")
    tok = load_tokenizer(world_dir / "tokenizer")
    es.build_corpus_index(root / "idx", world_dir / "heldout" / "corpus.jsonl", config, cfg,
                          params, tok, limit=24)
    export_bundle(root / "run", root / "bundle", index=root / "idx", progress=False)

    one = load_pipeline(checkpoint=root / "run", index=root / "idx",
                        mesh=make_mesh(devices=jax.devices()[:1]), **SETTINGS)
    sharded = load_pipeline(checkpoint=root / "run", index=root / "idx", **SETTINGS)
    bundled = load_pipeline(bundle=root / "bundle", **SETTINGS)
    items, _ = load_items(world_dir, sharded.index, limit=6)
    questions = [it.question for it in items]  # 6 rows: the mesh's batch of 4 pads to 8

    ref = _answers(one, questions)
    facts = {"devices": len(jax.devices()), "one_device_mesh": dict(one.mesh.shape),
             **_params_facts(sharded), **_encoder_facts(sharded, questions),
             **_generate_facts(sharded, questions),
             "bundle": _params_facts(bundled),
             "checkpoint_answers_equal": _same(ref, _answers(sharded, questions)),
             "bundle_answers_equal": _same(ref, _answers(bundled, questions))}
    s_one, p_one = evaluate(one, items, "latent", progress=False, warmup=False,
                            return_predictions=True)
    s_mesh, p_mesh = evaluate(sharded, items, "latent", progress=False, warmup=False,
                              return_predictions=True)
    facts.update(eval_mesh=s_mesh["environment"]["mesh"],
                 eval_predictions_equal=[p["prediction"] for p in p_one]
                 == [p["prediction"] for p in p_mesh],
                 eval_em_equal=s_one["em"] == s_mesh["em"])
    code, _, err = es.clara_in_process("ask", f"--bundle={root / 'bundle'}", "--backend=exact",
                                       "--max_new_tokens=6", questions[0])
    facts["ask_status"] = code
    facts["ask_summary"] = json.loads(err.strip().splitlines()[-1]) if code == 0 else err
    print(json.dumps(facts))


if __name__ == "__main__":
    main()
