"""Shared test setup: the benchmark protocol's threading and fixed seeds.

Trained zoo weights come from the user cache (``SLIMKIT_CACHE_DIR`` overrides it), so they are
trained once per machine; tests that check training itself use a temporary cache of their own.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
