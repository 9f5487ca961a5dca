"""projects/channel/capacity.py: the matched-filter read of an ideal random-code write gives
the numbers docs/config.md quotes for choosing model.latent_dim."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "channel_capacity", Path(__file__).resolve().parents[1] / "capacity.py")
capacity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(capacity)


def test_one_token_a_latent_reads_back_exactly():
    assert capacity.matched_filter_accuracy(1, 64, 200, 500, seed=0) == 1.0


@pytest.mark.parametrize("rate,width,low,high", [(9, 192, 0.95, 0.99), (18, 192, 0.66, 0.75),
                                                 (18, 64, 0.18, 0.25)])
def test_the_quoted_capacities(rate, width, low, high):
    assert low <= capacity.matched_filter_accuracy(rate, width, 200, 2000, seed=1) <= high


def test_more_tokens_a_latent_read_back_worse_and_wider_latents_better():
    acc = {(r, w): capacity.matched_filter_accuracy(r, w, 200, 1000, seed=2)
           for r in (9, 18) for w in (64, 256)}
    assert acc[18, 64] < acc[9, 64] < acc[9, 256]
    assert acc[18, 64] < acc[18, 256]
