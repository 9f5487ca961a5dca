"""Compile census: times every XLA compilation in every Python process that imports JAX.

Copy into a test venv's site-packages (it must be named sitecustomize.py) and run the suite
with CSTATS_DIR set; each process that compiled writes CSTATS_DIR/<pid>.json: {"argv", "wall",
"rec": [[PYTEST_CURRENT_TEST, module name, seconds], ...]}. `report.py` sums them.

    cp projects/suite_time/census/sitecustomize.py .venv/lib/python3.11/site-packages/
    CSTATS_DIR=/tmp/census .venv/bin/python -m pytest -q -n 2 --dist loadfile tests projects
    python projects/suite_time/census/report.py /tmp/census

A process ended by os._exit or a signal writes nothing. Without CSTATS_DIR it does nothing.
"""

import atexit
import importlib.abc
import importlib.machinery
import json
import os
import sys
import time

_T0 = time.time()
_REC: list = []
_DIR = os.environ.get("CSTATS_DIR")


def _time_compiles(compiler) -> None:
    """Wraps jax._src.compiler.backend_compile_and_load (every XLA compilation, cache misses
    only: a persistent-cache hit does not compile)."""
    orig = compiler.backend_compile_and_load

    def wrapped(backend, module, *args, **kwargs):
        t = time.perf_counter()
        try:
            return orig(backend, module, *args, **kwargs)
        finally:
            try:
                name = str(module.operation.attributes["sym_name"]).strip('"')
            except Exception:
                name = "?"
            _REC.append((os.environ.get("PYTEST_CURRENT_TEST", ""), name,
                         round(time.perf_counter() - t, 4)))

    compiler.backend_compile_and_load = wrapped


class _WhenJaxCompilerLoads(importlib.abc.MetaPathFinder):
    """Installs the timer right after jax._src.compiler executes, without importing JAX into
    processes that never use it."""

    def find_spec(self, name, path, target=None):
        if name != "jax._src.compiler":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        exec_module = spec.loader.exec_module

        def exec_and_time(module):
            exec_module(module)
            _time_compiles(module)

        spec.loader.exec_module = exec_and_time
        return spec


def _dump() -> None:
    if _REC:
        os.makedirs(_DIR, exist_ok=True)
        with open(os.path.join(_DIR, f"{os.getpid()}.json"), "w") as f:
            json.dump({"argv": sys.argv[:4], "wall": time.time() - _T0, "rec": _REC}, f)


if _DIR:
    sys.meta_path.insert(0, _WhenJaxCompilerLoads())
    atexit.register(_dump)
