"""Serving on a mesh (clara_jax/infer/serving.py): a checkpoint whose config.mesh is fsdp=2,
tensor=2, loaded on 8 simulated CPU devices (tests/multidevice_serve.py, in a subprocess so
that XLA sees 8 devices), from the run and from its bundle: the params are split as the
logical-axis rules say, the encoder's and generator's batches are split over (data, fsdp), and
the answers of `RagPipeline.answer`, `evaluate` and `clara ask` equal the one-device answers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import xla_flags
from tests.eval_support import REPO


def test_a_checkpoint_and_its_bundle_serve_sharded_on_config_mesh(tmp_path):
    env = dict(os.environ, XLA_FLAGS=xla_flags(8),
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, str(REPO / "tests" / "multidevice_serve.py"),
                          str(tmp_path)], env=env, capture_output=True, text=True, timeout=900,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(r, indent=1))  # shown on failure: every fact at once
    mesh = {"data": 2, "fsdp": 2, "tensor": 2}  # data=-1 takes the 8 / (2 x 2) left
    assert r["devices"] == 8 and r["one_device_mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
    for facts in (r, r["bundle"]):
        assert facts["mesh"] == mesh
        assert facts["params_as_rules"]
        # Most weights are split (embed over fsdp, heads / mlp / vocab over tensor); only
        # norms, LoRA factors and memory embeddings whose axes map to no mesh axis stay whole.
        assert facts["params_split"] > facts["params_total"] // 2
        # q kernel [D, N, H] = [64, 4, 16]: D over fsdp, N over tensor.
        assert facts["q_kernel_shape"] == [64, 4, 16]
        assert facts["q_kernel_shard_shape"] == [32, 2, 16]
    # 6 questions: the encoder's batch (8) and the generator's bucket (8, a multiple of
    # data x fsdp = 4) are split 2 rows per device, in and out.
    assert r["encode_batch"] == 8 and r["encode_tokens_in_split"] and r["encode_out_split"]
    assert r["encode_out_rows_per_device"] == [2]
    assert r["generate_batch"] == 8 and r["generate_batch_in_split"]
    assert r["generate_params_in_mismatches"] == [] and r["generate_out_split"]
    assert r["generate_out_rows_per_device"] == [2]
    # Same tokens, documents and scores as one device, in all three modes.
    assert r["checkpoint_answers_equal"] and r["bundle_answers_equal"]
    assert r["eval_mesh"] == mesh and r["eval_predictions_equal"] and r["eval_em_equal"]
    assert r["ask_status"] == 0 and r["ask_summary"]["mesh"] == mesh, r["ask_summary"]
