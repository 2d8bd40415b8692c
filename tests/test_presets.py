"""Presets as data over the public API: every preset can be swept over `eps` and `seed`."""

import inspect

import equinox as eqx
import jax.tree_util as jtu
import numpy as np
import pytest
from conftest import REDUCED_PRESETS, REDUCED_RANK_COLLAPSE

import gflow
from gflow import presets

# Small sizes: building a problem draws data and an init, nothing is compiled.
_SMALL = REDUCED_PRESETS | {"deep-linear": [], "rank-collapse-binary": [],
                            "rank-collapse": REDUCED_RANK_COLLAPSE}


def test_every_preset_exposes_eps_and_seed():
    assert sorted(_SMALL) == presets.preset_names()
    for name in presets.preset_names():
        problem = presets.preset_config(name)["problem"]
        # `eps` is in the config, or an optional builder argument (rank-collapse: default
        # the paper's d^-0.85, which a TOML value could not follow when d is changed).
        accepted = inspect.signature(presets.PROBLEMS[problem["kind"]]).parameters
        assert "eps" in problem or "eps" in accepted, name
        assert "seed" in problem, name


@pytest.mark.parametrize("name", ["cooccurrence", "anchor"])
def test_eps_scales_exactly_the_trainable_init(name):
    """Presets whose own init scale has other names (sigma, gamma) take `eps` as a factor."""
    build = lambda eps: presets.build(presets.resolve(name, _SMALL[name] + [f"problem.eps={eps}"]))
    one, half = build(1.0).flow, build(0.5).flow
    for a, b in zip(jtu.tree_leaves(one.params), jtu.tree_leaves(half.params)):
        np.testing.assert_array_equal(0.5 * np.asarray(a), np.asarray(b))
    # Frozen leaves (readout signs, frozen embeddings) are not part of the init scale.
    frozen = lambda flow: jtu.tree_leaves(eqx.partition(flow.model, flow.trainable)[1])
    for a, b in zip(frozen(one), frozen(half)):
        if eqx.is_array(a):
            np.testing.assert_array_equal(a, b)
    # The seed changes the draw.
    other = presets.build(presets.resolve(name, _SMALL[name] + ["problem.seed=1"])).flow
    assert not np.array_equal(jtu.tree_leaves(one.params)[0], jtu.tree_leaves(other.params)[0])


def test_eps_must_be_positive():
    with pytest.raises(gflow.InputError, match="problem.eps must be positive"):
        presets.build(presets.resolve("cooccurrence", _SMALL["cooccurrence"] + ["problem.eps=0"]))
