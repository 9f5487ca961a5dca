"""Started by launch/local_multiprocess.sh in tests: joins the multi-process runtime through
clara_jax.distributed and prints what every process sees, gathered on all of them."""

from __future__ import annotations

import json

from clara_jax import distributed


def main() -> None:
    assert distributed.initialize()
    import jax
    import jax.numpy as jnp
    from jax.experimental import multihost_utils

    ids = multihost_utils.process_allgather(jnp.array([jax.process_index()]))
    print(json.dumps({"process_index": jax.process_index(), "process_count": jax.process_count(),
                      "devices": jax.device_count(), "local_devices": jax.local_device_count(),
                      "gathered": sorted(int(x) for x in ids.reshape(-1)),
                      "main": distributed.is_main_process()}))


if __name__ == "__main__":
    main()
