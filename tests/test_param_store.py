"""clara_jax.param_store: leaf names, safetensors (float and int8 rows) and orbax params-only
round trips, and the errors that name the tensor that does not fit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clara_jax import param_store as ps


@pytest.fixture()
def tree():
    rng = np.random.default_rng(0)
    return {"decoder": {"layers_0": {"q": {"kernel": jnp.asarray(rng.normal(size=(8, 4)),
                                                                  jnp.float32)},
                                     "norm": {"scale": jnp.ones((4,), jnp.float32)}},
                        "embed": jnp.asarray(rng.normal(size=(16, 4)), jnp.bfloat16)},
            "memory_embeddings": jnp.asarray(rng.normal(size=(2, 4)), jnp.float32)}


def test_names_are_slash_joined_dict_keys(tree):
    names = sorted(ps.flatten(tree))
    assert names == ["decoder/embed", "decoder/layers_0/norm/scale",
                     "decoder/layers_0/q/kernel", "memory_embeddings"]
    path, _ = jax.tree_util.tree_leaves_with_path(tree)[0]
    assert ps.path_keys(path) == ("decoder", "embed")


def test_safetensors_round_trip_keeps_values_and_dtypes(tree, tmp_path):
    info = ps.save_safetensors(ps.flatten(tree), tmp_path / "p.safetensors", {"step": 3})
    assert info["max_abs_error"] == 0 and info["bytes"] > 0
    back = ps.unflatten_like(ps.load_safetensors(tmp_path / "p.safetensors"), tree, "p")
    assert back["decoder"]["embed"].dtype == jnp.bfloat16
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    assert not list(tmp_path.glob("*.tmp"))


def test_int8_rows_are_a_quarter_and_close(tree, tmp_path):
    flat = {k: np.asarray(v, np.float32) for k, v in ps.flatten(tree).items()}
    # Big enough that the bytes, not the header, decide the file size.
    flat["big"] = np.random.default_rng(1).normal(size=(128, 64)).astype(np.float32)
    full = ps.save_safetensors(flat, tmp_path / "f.safetensors")
    small = ps.save_safetensors(flat, tmp_path / "q.safetensors", int8=True)
    assert 0 < small["max_abs_error"] < 0.02
    back = ps.load_safetensors(tmp_path / "q.safetensors")
    assert set(back) == set(flat)  # the scales are folded back in
    kernel = flat["decoder/layers_0/q/kernel"]
    np.testing.assert_allclose(back["decoder/layers_0/q/kernel"], kernel,
                               atol=np.abs(kernel).max() / 127)
    np.testing.assert_array_equal(back["decoder/layers_0/norm/scale"], np.ones(4))
    assert small["bytes"] < 0.35 * full["bytes"]


def test_unflatten_names_the_missing_misshapen_or_extra_tensor(tree):
    flat = ps.flatten(tree)
    with pytest.raises(ValueError, match=r"src: no tensor 'memory_embeddings'"):
        ps.unflatten_like({k: v for k, v in flat.items() if k != "memory_embeddings"}, tree,
                          "src")
    with pytest.raises(ValueError, match=r"tensor 'decoder/embed' has shape \(3, 4\)"):
        ps.unflatten_like({**flat, "decoder/embed": np.zeros((3, 4))}, tree, "src")
    with pytest.raises(ValueError, match=r"tensors the model does not have: \['stray'\]"):
        ps.unflatten_like({**flat, "stray": np.zeros(1)}, tree, "src")


def test_orbax_params_keep_the_stored_dtypes(tree, tmp_path):
    ps.save_orbax(tmp_path / "params", tree)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), tree)
    back = ps.load_orbax(tmp_path / "params", abstract)
    assert back["decoder"]["embed"].dtype == jnp.bfloat16  # stored bf16 wins over float32
    np.testing.assert_array_equal(back["memory_embeddings"], tree["memory_embeddings"])
    with pytest.raises(FileNotFoundError, match="nowhere: no such directory"):
        ps.load_orbax(tmp_path / "nowhere", abstract)
