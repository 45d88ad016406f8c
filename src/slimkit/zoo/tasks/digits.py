"""``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, no download).

Images are float32 (1, 8, 8) scaled to [0, 1]; a stratified 70 / 10 / 20 split with a fixed seed.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

from slimkit.zoo.tasks import TASKS, Task

SEED = 0


def _dataset(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.from_numpy(x).float(), torch.from_numpy(y).long())


@TASKS.register("digits", kind="classification", summary="8x8 handwritten digits, 10 classes")
def digits() -> Task:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[:, None]  # (N, 1, 8, 8), pixel values were 0..16
    y = data.target.astype(np.int64)
    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=0.2, stratify=y, random_state=SEED
    )
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=0.125, stratify=y_rest, random_state=SEED
    )  # 0.125 of 80 % = 10 % of the whole
    return Task(
        name="digits",
        kind="classification",
        train=_dataset(x_train, y_train),
        val=_dataset(x_val, y_val),
        test=_dataset(x_test, y_test),
        num_classes=10,
        input_shape=(1, 8, 8),
        classes=tuple(str(i) for i in range(10)),
        meta={"source": "sklearn.datasets.load_digits"},
    )
