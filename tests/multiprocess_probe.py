"""Started by launch/local_multiprocess.sh in tests: joins the multi-process runtime through
clara_jax.distributed and writes what every process sees, gathered on all of them, to
OUT_DIR/probe_<process index>.json (its own file: the runtime's C++ logging shares the log)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from clara_jax import distributed
from clara_jax.fileio import atomic_write_text


def main() -> None:
    assert distributed.initialize()
    import jax
    import jax.numpy as jnp
    from jax.experimental import multihost_utils

    ids = multihost_utils.process_allgather(jnp.array([jax.process_index()]))
    seen = json.dumps({"process_index": jax.process_index(),
                       "process_count": jax.process_count(), "devices": jax.device_count(),
                       "local_devices": jax.local_device_count(),
                       "gathered": sorted(int(x) for x in ids.reshape(-1)),
                       "main": distributed.is_main_process()})
    atomic_write_text(Path(sys.argv[1]) / f"probe_{jax.process_index()}.json", seen)


if __name__ == "__main__":
    main()
