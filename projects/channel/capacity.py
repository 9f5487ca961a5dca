"""Diagnostic: how much of a document an ideal write leaves linearly readable in one latent.

The write is the decoder mode's oracle (`probe_parts.py --mode decoder`): latent =
sum over the R sub-positions r of a fixed random unit vector g[r, token_r] in L dimensions,
no learning. The read is the matched filter of sub-position r, argmax over the alphabet of
<latent, g[r, v]>, the best linear read of a random code; a learned write could place the R
tokens in near-orthogonal subspaces and do better, so this is a floor on the capacity an
L-wide latent has at rate R, not a ceiling. Prints one JSON line per (R, L).

    .venv/bin/python projects/channel/capacity.py
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def matched_filter_accuracy(rate: int, width: int, alphabet: int, docs: int, seed: int) -> float:
    """Token accuracy of the matched-filter read of `docs` random documents of `rate` tokens
    written as one `width`-dimensional sum of random unit codes."""
    rng = np.random.default_rng(seed)
    codes = rng.normal(size=(rate, alphabet, width))
    codes /= np.linalg.norm(codes, axis=-1, keepdims=True)  # [R, V, L]
    tokens = rng.integers(0, alphabet, (docs, rate))  # [B, R]
    latents = codes[np.arange(rate), tokens].sum(1)  # [B, L]
    scores = np.einsum("bl,rvl->brv", latents, codes)  # [B, R, V]
    return float(np.mean(scores.argmax(-1) == tokens))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rates", type=int, nargs="+", default=[5, 9, 18])
    p.add_argument("--widths", type=int, nargs="+", default=[64, 192, 256, 512])
    p.add_argument("--alphabet", type=int, default=200)
    p.add_argument("--docs", type=int, default=2000)
    args = p.parse_args()
    for rate in args.rates:
        for width in args.widths:
            acc = matched_filter_accuracy(rate, width, args.alphabet, args.docs, seed=rate * width)
            print(json.dumps({"rate": rate, "latent_width": width, "alphabet": args.alphabet,
                              "matched_filter_accuracy": round(acc, 4)}))


if __name__ == "__main__":
    main()
