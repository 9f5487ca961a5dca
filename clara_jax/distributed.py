"""Multi-process start-up: the one place that calls `jax.distributed.initialize`.

Settings come from flags or, for launchers, the environment (flags win):

| flag                    | environment            | meaning                                   |
| ---                     | ---                    | ---                                       |
| --coordinator_address   | CLARA_COORDINATOR      | host:port of process 0                    |
| --num_processes         | CLARA_NUM_PROCESSES    | number of processes                       |
| --process_id            | CLARA_PROCESS_ID       | this process's index                      |
| --distributed           | CLARA_DISTRIBUTED      | auto (default), cluster, off              |
| --distributed_timeout_s | CLARA_DISTRIBUTED_TIMEOUT_S | seconds to wait for all processes    |

`auto` initializes when a coordinator and more than one process are given. `cluster` lets JAX
detect everything itself (Cloud TPU pod slices, SLURM, Open MPI); the TPU and SLURM launchers
use it or pass the explicit settings. `off` never initializes.

Exchanges between host programs (`allgather_bytes`, `allgather_json`, `allgather_arrays`):
every process gives its own value, of any size, and gets every process's, in process order.
Each is a collective (every process must call it, in the same order) and so also a barrier;
with one process they return `[value]` and touch no device.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import socket
import sys
import time

import jax
import numpy as np
from absl import flags
from jax.experimental import multihost_utils

_MODES = ("auto", "cluster", "off")


class DistributedInitError(RuntimeError):
    """The processes could not find each other; the message says who waited for whom."""


@dataclasses.dataclass(frozen=True)
class Settings:
    mode: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    timeout_s: int = 300


def define_flags() -> None:
    flags.DEFINE_enum("distributed", None, _MODES,
                      "Multi-process start-up: auto, cluster (JAX detects TPU pod / SLURM), off. "
                      "Default: $CLARA_DISTRIBUTED or auto.")
    flags.DEFINE_string("coordinator_address", None,
                        "host:port of process 0 (default $CLARA_COORDINATOR).")
    flags.DEFINE_integer("num_processes", None, "Process count (default $CLARA_NUM_PROCESSES).")
    flags.DEFINE_integer("process_id", None, "This process's index (default $CLARA_PROCESS_ID).")
    flags.DEFINE_integer("distributed_timeout_s", None,
                         "Seconds to wait for every process (default 300).")


def _int_env(env, name: str) -> int | None:
    value = env.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedInitError(f"${name}={value!r} is not an integer") from None


def resolve(flag_values: dict | None = None, env=None) -> Settings:
    """Settings from flag values (None = unset) over the environment."""
    env = os.environ if env is None else env
    fv = flag_values or {}

    def pick(flag, value_from_env):
        return fv.get(flag) if fv.get(flag) is not None else value_from_env

    mode = pick("distributed", env.get("CLARA_DISTRIBUTED") or "auto")
    if mode not in _MODES:
        raise DistributedInitError(f"distributed mode {mode!r} is not one of {_MODES}")
    settings = Settings(
        mode=mode,
        coordinator_address=pick("coordinator_address", env.get("CLARA_COORDINATOR") or None),
        num_processes=pick("num_processes", _int_env(env, "CLARA_NUM_PROCESSES")),
        process_id=pick("process_id", _int_env(env, "CLARA_PROCESS_ID")),
        timeout_s=pick("distributed_timeout_s", _int_env(env, "CLARA_DISTRIBUTED_TIMEOUT_S"))
        or 300,
    )
    if settings.mode == "auto" and (settings.num_processes or 1) > 1:
        missing = [name for name, v in (("coordinator_address", settings.coordinator_address),
                                        ("process_id", settings.process_id)) if v is None]
        if missing:
            raise DistributedInitError(
                f"{settings.num_processes} processes requested but {', '.join(missing)} not "
                "given (flags or $CLARA_COORDINATOR / $CLARA_PROCESS_ID)")
        if not 0 <= settings.process_id < settings.num_processes:
            raise DistributedInitError(f"process_id={settings.process_id} is outside "
                                       f"[0, num_processes={settings.num_processes})")
    return settings


def _flag_values() -> dict:
    names = ("distributed", "coordinator_address", "num_processes", "process_id",
             "distributed_timeout_s")
    fl = flags.FLAGS
    return {n: fl[n].value for n in names if n in fl}


def initialize(settings: Settings | None = None) -> bool:
    """Starts the multi-process runtime if the settings ask for it; True when it did.

    Must run before anything touches a JAX device.
    """
    s = settings or resolve(_flag_values())
    wanted = s.mode == "cluster" or (s.mode == "auto" and (s.num_processes or 1) > 1)
    if not wanted:
        return False
    # CPU hosts need a collectives backend across processes; GPU/TPU ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if s.mode == "auto":
        where = (f"coordinator {s.coordinator_address} as process {s.process_id} of "
                 f"{s.num_processes}")
        # XLA's client aborts the whole process when the coordinator never answers, with no
        # Python exception; so say beforehand what we wait for, and check reachability here.
        print(f"clara: joining {where} (timeout {s.timeout_s}s)", file=sys.stderr, flush=True)
        if s.process_id != 0:
            _wait_for_coordinator(s, where)
    try:
        if s.mode == "cluster":
            jax.distributed.initialize(initialization_timeout=s.timeout_s)
        else:
            jax.distributed.initialize(s.coordinator_address, s.num_processes, s.process_id,
                                       initialization_timeout=s.timeout_s)
    except Exception as err:  # noqa: BLE001 - re-raised with who waited for whom
        where = ("cluster auto-detection" if s.mode == "cluster" else
                 f"coordinator {s.coordinator_address} as process {s.process_id} of "
                 f"{s.num_processes}")
        raise DistributedInitError(
            f"jax.distributed.initialize failed via {where} within {s.timeout_s}s: {err}") from err
    return True


def _wait_for_coordinator(s: Settings, where: str) -> None:
    host, _, port = s.coordinator_address.rpartition(":")
    deadline = time.monotonic() + s.timeout_s
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
            return
        except OSError as err:
            if time.monotonic() > deadline:
                raise DistributedInitError(
                    f"could not reach {where} within {s.timeout_s}s: {err}") from None
            time.sleep(0.5)


def is_main_process() -> bool:
    """Only process 0 writes logs, metrics and exports."""
    return jax.process_index() == 0


def allgather_bytes(data: bytes) -> list[bytes]:
    """Every process's `data` (any length), in process order, on every process."""
    if jax.process_count() == 1:
        return [bytes(data)]

    blob = np.frombuffer(data, np.uint8)
    # Two rounds: the sizes, then the bytes padded to the largest (the gather needs one
    # shape). Bytes, not typed arrays, so int64 and float values cross exactly whatever
    # jax_enable_x64 says.
    sizes = np.asarray(multihost_utils.process_allgather(np.array([blob.size], np.int32)))
    padded = np.zeros(max(int(sizes.max()), 1), np.uint8)
    padded[:blob.size] = blob
    everyone = np.asarray(multihost_utils.process_allgather(padded))
    return [everyone[p, :int(sizes[p][0])].tobytes() for p in range(len(sizes))]


def allgather_json(obj) -> list:
    """Every process's JSON-able `obj`, in process order, on every process."""
    if jax.process_count() == 1:
        return [obj]
    return [json.loads(b.decode()) for b in allgather_bytes(json.dumps(obj).encode())]


def allgather_arrays(arrays: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Every process's {name: array} (its own shapes and dtypes, bit-exact), in process
    order, on every process."""
    if jax.process_count() == 1:
        return [dict(arrays)]
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    out = []
    for b in allgather_bytes(buf.getvalue()):
        with np.load(io.BytesIO(b), allow_pickle=False) as z:
            out.append({name: z[name] for name in z.files})
    return out
