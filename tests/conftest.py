"""Shared test setup: the benchmark protocol's threading and fixed seeds.

Trained zoo weights come from the user cache (``SLIMKIT_CACHE_DIR`` overrides it), so they are
trained once per machine; tests that check training itself use a temporary cache of their own.
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: on a busy 2-core machine spinning threads made
# one small forward pass 100x slower (2 s instead of 14 ms).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import random  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
