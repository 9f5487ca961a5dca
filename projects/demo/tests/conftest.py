"""The project's tests use the library suite's session fixtures (the tiny config and model,
the tiny pretrained start, the shared XLA compilation cache)."""

from tests.conftest import tiny_cfg, tiny_config, tiny_params, tiny_start  # noqa: F401
from tests.world_support import built  # noqa: F401
