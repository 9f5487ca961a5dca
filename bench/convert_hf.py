"""Conversion time and peak host memory of `clara_jax.convert.hf.load` and `save`.

    .venv/bin/python bench/convert_hf.py [--dim 2048 --layers 8 --vocab 32000 --mlp 5632]

Writes a random Llama-shaped float32 checkpoint (streamed, never whole in memory) into a temp
directory, then in a fresh subprocess each: from-hf (`load`) and to-hf (`save`), reporting wall
time and the process's peak RSS (resource.getrusage) next to the checkpoint size. With
`--fixtures`, also the logit max-abs differences against the PyTorch fixtures. Last line: one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class _RssSampler:
    """Peak anonymous and file-backed RSS, sampled every 20 ms from /proc/self/status.

    ru_maxrss counts the checkpoint's pages that safetensors memory-maps (page cache, shared
    and reclaimable) together with the process's own allocations; the split tells them apart.
    """

    def __init__(self):
        import threading

        self.peak = {"RssAnon": 0, "RssFile": 0}
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            with open("/proc/self/status") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    if key in self.peak:
                        self.peak[key] = max(self.peak[key], int(value.split()[0]) * 1024)
            time.sleep(0.02)


def make_checkpoint(out: Path, dim: int, layers: int, vocab: int, mlp: int, heads: int,
                    kv_heads: int) -> int:
    """A random Llama checkpoint written tensor by tensor; returns its size in bytes."""
    import numpy as np

    from clara_jax.convert import hf
    from clara_jax.model import ModelConfig

    cfg = ModelConfig(vocab_size=vocab, dim=dim, n_layers=layers, n_heads=heads,
                      n_kv_heads=kv_heads, head_dim=dim // heads, mlp_dim=mlp,
                      num_memory_tokens=16)
    rng = np.random.default_rng(0)
    entries = []
    for t in hf._tensor_map(cfg):
        norm = t.name.endswith("norm.weight")

        def make(shape=t.hf_shape, norm=norm):
            x = rng.standard_normal(shape, dtype=np.float32) * 0.02
            return x + 1.0 if norm else x
        entries.append((t.name, t.hf_shape, np.dtype(np.float32), make))
    out.mkdir(parents=True)
    hf._write_safetensors(out / hf.SINGLE_FILE, entries, {"format": "pt"})
    (out / hf.CONFIG_FILE).write_text(json.dumps(hf.hf_config_from_model_config(cfg)))
    return (out / hf.SINGLE_FILE).stat().st_size


def child(mode: str, src: str, dst: str, scan_layers: bool) -> None:
    """Runs one conversion in this (fresh) process and prints its JSON numbers."""
    import jax

    from clara_jax.convert import hf

    sampler = _RssSampler()
    rss0 = _peak_rss_bytes()  # exec keeps the parent's ru_maxrss on Linux: a floor, not a start
    start = time.perf_counter()
    cfg, params = hf.load(src, progress=False, scan_layers=scan_layers)
    jax.block_until_ready(params)
    load_s = time.perf_counter() - start
    out = {"load_s": round(load_s, 2), "load_peak_rss": _peak_rss_bytes(), "rss_at_start": rss0}
    if mode == "save":
        start = time.perf_counter()
        hf.save(cfg, params, dst, progress=False)
        out["save_s"] = round(time.perf_counter() - start, 2)
        out["save_peak_rss"] = _peak_rss_bytes()
    out["peak_anon"] = sampler.peak["RssAnon"]
    out["peak_file_mapped"] = sampler.peak["RssFile"]
    print(json.dumps(out))


def fixture_diffs() -> dict:
    import numpy as np

    from clara_jax.convert import hf
    from clara_jax.model import forward_logits

    out = {}
    fixtures = REPO / "tests" / "fixtures" / "hf"
    for family in ("llama", "llama_tied", "mistral", "qwen2"):
        cfg, params = hf.load(fixtures / family, progress=False)
        ref = np.load(fixtures / family / "reference.npz")
        prompts = json.loads((fixtures / family / "reference.json").read_text())["prompts"]
        out[family] = max(float(np.abs(np.asarray(forward_logits(
            cfg, params, np.asarray([ids], np.int32))) - ref[f"logits_{i}"]).max())
            for i, ids in enumerate(prompts))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--mlp", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv_heads", type=int, default=4)
    parser.add_argument("--fixtures", action="store_true")
    parser.add_argument("--scan_layers", action="store_true",
                        help="load into the stacked-layer layout")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, scan_layers=args.scan_layers)
        return
    result = {}
    if args.fixtures:
        result["logit_max_abs_diff"] = fixture_diffs()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "ckpt"
        size = make_checkpoint(src, args.dim, args.layers, args.vocab, args.mlp, args.heads,
                               args.kv_heads)
        result["checkpoint_bytes"] = size
        result["shape"] = {k: getattr(args, k) for k in
                           ("dim", "layers", "vocab", "mlp", "heads", "kv_heads", "scan_layers")}
        for mode in ("load", "save"):
            run = subprocess.run([sys.executable, __file__, "--child", mode, str(src),
                                  str(Path(tmp) / f"out_{mode}")]
                                 + (["--scan_layers"] if args.scan_layers else []),
                                 capture_output=True, text=True, check=True)
            result[mode] = json.loads(run.stdout.strip().splitlines()[-1])
    result["load_peak_rss_over_checkpoint"] = round(result["load"]["load_peak_rss"] / size, 2)
    result["save_peak_rss_over_checkpoint"] = round(result["save"]["save_peak_rss"] / size, 2)
    result["load_peak_anon_over_checkpoint"] = round(result["load"]["peak_anon"] / size, 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
