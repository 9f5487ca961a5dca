"""Subprocess entry for the loop tests: runs `clara_jax.train.loop.train` on the tiny config
with the synthetic contract loader, as the same command each time.

usage: python tests/train_run.py WORKDIR STAGE STEPS [--kill_at=N] [--sigterm_at=N]
  --kill_at=N     the process dies abruptly (os._exit) when the loader is asked for batch N
  --sigterm_at=N  the process sends itself SIGTERM when asked for batch N
  --nan_at=N      batch N has out-of-vocabulary targets, so its loss is NaN
  --nan_policy=P  train.nan_policy
  --profile_steps=N  train.profile_steps
Prints one JSON line: the run's status and step.
"""

from __future__ import annotations

import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clara_jax.train.loop import train  # noqa: E402
from configs import tiny  # noqa: E402
from tests.train_support import SyntheticLoader  # noqa: E402


class _Faulty(SyntheticLoader):
    def __init__(self, *a, kill_at=None, sigterm_at=None, nan_at=None, **kw):
        super().__init__(*a, **kw)
        self.kill_at, self.sigterm_at, self.nan_at = kill_at, sigterm_at, nan_at

    def __next__(self):
        if self.index == self.kill_at:
            os._exit(9)  # like SIGKILL: no cleanup, async saves cut off
        if self.index == self.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        bad = self.index == self.nan_at
        batch = super().__next__()
        if bad:  # an out-of-range target id: the CE gathers NaN
            batch["targets"] = batch["targets"] + self.config.model.vocab_size
        return batch


def main() -> None:
    workdir, stage, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    opts = dict(a[2:].split("=") for a in sys.argv[4:])
    config = tiny.get_config()
    config.train.stage = stage
    config.train.steps = steps
    config.train.log_every = 1
    config.train.checkpoint_every = 5
    config.train.nan_policy = opts.get("nan_policy", "stop")
    config.train.profile_steps = int(opts.get("profile_steps", 0))
    config.model.lora.dropout = 0.1  # so resume must also restore the dropout keys

    def factory(cfg, st, split):
        if split != "train":
            return SyntheticLoader(cfg, st, seed=1)
        return _Faulty(cfg, st, seed=0, kill_at=int(opts.get("kill_at", -1)),
                       sigterm_at=int(opts.get("sigterm_at", -1)),
                       nan_at=int(opts.get("nan_at", -1)))

    result = train(config, workdir, factory, progress=False)
    print(json.dumps({"status": result.status, "step": result.step}))


if __name__ == "__main__":
    main()
