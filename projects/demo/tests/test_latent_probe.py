"""projects/demo/latent_probe.py: the probe separates what is linearly there and not noise, and on a
tiny checkpoint it labels the very documents of the prepared world."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clara_jax.data import world
from clara_jax.data.prepare import prepare_world
from tests import eval_support as es


@pytest.fixture(scope="module")
def bench():
    return es.load_script("projects/demo/latent_probe.py")


def test_probe_finds_a_linear_code_and_not_noise(bench):
    rng = np.random.default_rng(0)
    classes, dim = 12, 64
    codes = rng.normal(size=(classes, dim))
    y_tr, y_te = rng.integers(0, classes, 600), rng.integers(0, classes, 200)

    def noisy(y):
        return codes[y] + 0.5 * rng.normal(size=(len(y), dim))

    train_acc, test_acc = bench.fit_probe(noisy(y_tr), y_tr, noisy(y_te), y_te, classes)
    assert train_acc > 0.95 and test_acc > 0.95
    noise = rng.normal(size=(800, dim))
    _, test_acc = bench.fit_probe(noise[:600], y_tr, noise[600:], y_te, classes)
    assert test_acc < 0.25  # chance is 1/12


def test_probe_on_a_tiny_checkpoint(tmp_path, tiny_params, bench):
    config = es.fresh_config(tmp_path / "data")
    prepare_world(tmp_path / "data", config, formats=("corpus",), progress=False)
    es.save_checkpoint(config, es.perturbed(tiny_params), tmp_path / "run")

    result = bench.measure(tmp_path / "run", tmp_path / "data",
                           attrs="person.hobby,organisation.industry", steps=20)

    worlds = world.make_worlds(0, "small")
    corpus = {json.loads(line)["id"]: json.loads(line)["text"]
              for line in open(tmp_path / "data" / "heldout" / "corpus.jsonl")}
    assert {k: v for k, v in worlds["heldout"].docs.items()} == corpus  # the same documents
    for spec, kind, attr in (("person.hobby", "person", "hobby"),
                             ("organisation.industry", "organisation", "industry")):
        r = result["probes"][spec]
        train_values = [e.facts[attr] for e in worlds["train"].entities if e.kind == kind]
        held = [e.facts[attr] for e in worlds["heldout"].entities if e.kind == kind]
        assert r["train_n"] == len(train_values) and r["classes"] == len(set(train_values))
        assert r["heldout_n"] == sum(v in set(train_values) for v in held) > 0
        assert 0.0 <= r["heldout_acc"] <= 1.0 and 0.0 <= r["chance"] <= 1.0


def test_probe_refuses_a_directory_without_a_world(tmp_path, bench):
    with pytest.raises(SystemExit, match="world.json: missing"):
        bench._world_of(tmp_path)
