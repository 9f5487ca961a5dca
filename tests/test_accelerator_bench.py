"""bench/accelerator.py on the CPU with the tiny config and a few steps: its JSON has every
section, with sane values (no peak, so no MFU, on a CPU); and the peak table by device kind."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

from tests.conftest import REPO


def test_tiny_run_reports_every_section():
    cmd = [sys.executable, "bench/accelerator.py", "--size", "tiny", "--steps", "2",
           "--batches", "1,2", "--new_tokens", "4", "--questions", "4", "--repeats", "1"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["size"] == "tiny" and out["platform"] == "cpu" and out["skipped"] == []
    assert out["param_count"] == out["params"]["total"] > 0

    train = out["train"]
    assert train["stage"] == 2 and train["compute_dtype"] == "bfloat16"
    assert train["flops_per_step"] > 0 and train["xla_flops_per_step"] > 0
    assert train["flops_source"].startswith("analytic")
    assert train["step_s"] > 0 and train["tokens_per_s"] > 0 and train["achieved_tflops"] > 0
    assert train["peak_tflops_per_chip"] is None and train["mfu"] is None
    assert "--peak_tflops" in train["peak_source"]

    gen = out["generate"]
    assert set(gen["tokens_per_s_by_batch"]) == {"1", "2"}
    assert all(v > 0 for v in gen["tokens_per_s_by_batch"].values())
    assert all(v is None or v > 0 for v in gen["decode_tokens_per_s_by_batch"].values())

    rag = out["rag"]
    assert rag["questions"] == 4 and rag["num_docs"] == 2
    for mode in ("latent", "text"):
        assert rag[mode]["ms_per_batch"] > 0 and rag[mode]["stage_ms"]["generation"] > 0
        assert 0 < rag[mode]["answer_tokens_mean"] <= rag["answer_max_tokens"]
    assert rag["latent"]["prompt_tokens_mean"] < rag["text"]["prompt_tokens_mean"]
    assert rag["latent_vs_text_speedup"] > 0


def test_peak_by_device_kind():
    from bench.accelerator import peak_tflops

    def dev(kind):
        return SimpleNamespace(device_kind=kind)

    assert peak_tflops(dev("NVIDIA H200"), None)[0] == 989.4
    assert peak_tflops(dev("NVIDIA H100 80GB HBM3"), None)[0] == 989.4
    assert peak_tflops(dev("NVIDIA H100 PCIe"), None)[0] == 756.0
    assert peak_tflops(dev("TPU v5 lite"), None)[0] == 197.0
    assert peak_tflops(dev("cpu"), None)[0] is None
    assert peak_tflops(dev("cpu"), 2.5) == (2.5, "--peak_tflops")
