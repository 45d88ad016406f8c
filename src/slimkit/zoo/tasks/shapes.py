"""``shapes``: generated 32x32 RGB images of 10 shape classes (no download, deterministic by seed).

Each image holds one shape (disk, ring, square, frame, triangle, cross, bar, half disk, two dots,
star) of random position, size, colour and a rotation of up to 20 degrees, on a textured background
with a colour gradient, sometimes crossed by a thin line, with pixel noise. Most shapes are clear;
a tenth are small, faint and noisy, and some of those are genuinely ambiguous (a small ring looks
like a disk), so a good model stays below 100 % without any flipped label: ``small_cnn`` trained
for about a minute reaches about 89 %. Float32 (3, 32, 32) in [0, 1]; balanced classes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

from slimkit.zoo.tasks import TASKS, Task

CLASSES = (
    "disk", "ring", "square", "frame", "triangle", "cross", "bar", "half_disk", "pair", "star",
)  # fmt: skip
SIZE = 32
SUPERSAMPLE = 2  # shape masks are drawn at 2x and averaged: anti-aliased edges
SPLIT_SIZES = {"train": 10_000, "val": 1_000, "test": 2_000}
SPLIT_SEEDS = {"train": 1, "val": 2, "test": 3}  # different seeds: no image is in two splits
# A HARD_FRACTION of the images are small, faint and noisy (many are truly ambiguous); the rest
# are clear. Each range is (low, high) of a uniform draw: (easy, hard).
HARD_FRACTION = 0.1
RADIUS = ((6.0, 10.0), (3.0, 5.0))  # shape radius in pixels
CONTRAST = ((0.5, 0.8), (0.25, 0.6))  # distance between the shape's and the background's colour
NOISE = ((0.0, 0.03), (0.03, 0.08))  # std of the per-pixel Gaussian noise
ROTATION = 20.0  # largest rotation of a shape, in degrees either way
TEXTURE = 0.02  # std of the background's low-frequency texture
GRADIENT = 0.1  # largest amplitude of the background's linear gradient
MAX_LINES = 1  # clutter lines per image: 0 .. MAX_LINES


def _mask(k: int, u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Boolean mask of class ``k`` in the shape's own (rotated, centred) coordinates u, v."""
    au, av = np.abs(u), np.abs(v)
    rho = np.hypot(u, v)
    cheb = np.maximum(au, av)
    if k == 0:  # disk
        return rho < r
    if k == 1:  # ring
        return (rho < r) & (rho > 0.55 * r)
    if k == 2:  # square
        return cheb < 0.75 * r
    if k == 3:  # frame: a hollow square
        return (cheb < 0.8 * r) & (cheb > 0.5 * r)
    if k == 4:  # equilateral triangle with circumradius r
        m = np.ones(u.shape, dtype=bool)
        for a in (np.pi / 2, 7 * np.pi / 6, 11 * np.pi / 6):
            m &= u * np.cos(a) + v * np.sin(a) < 0.5 * r
        return m
    if k == 5:  # cross
        return ((au < 0.22 * r) & (av < r)) | ((av < 0.22 * r) & (au < r))
    if k == 6:  # bar
        return (au < r) & (av < 0.25 * r)
    if k == 7:  # half disk
        return (rho < r) & (v > 0)
    if k == 8:  # pair of dots
        return np.hypot(au - 0.55 * r, v) < 0.4 * r
    # five-pointed star
    return rho < r * (0.6 + 0.4 * np.cos(5 * np.arctan2(v, u)))


def _draw(ranges: tuple[tuple[float, float], ...], hard: np.ndarray, rng: np.random.Generator):
    lo, hi = np.array(ranges, dtype=np.float32)[hard.astype(int)].T
    return lo + (hi - lo) * rng.uniform(0, 1, len(hard)).astype(np.float32)


def _shape_masks(y: np.ndarray, r: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Anti-aliased coverage (n, SIZE, SIZE) in [0, 1] of one shape per image, class ``y[i]``."""
    n = len(y)
    cx = rng.uniform(0.7 * r, SIZE - 0.7 * r)  # may touch the border: partly cropped shapes
    cy = rng.uniform(0.7 * r, SIZE - 0.7 * r)
    theta = np.deg2rad(rng.uniform(-ROTATION, ROTATION, n))
    s = SUPERSAMPLE
    grid = (np.arange(SIZE * s, dtype=np.float32) + 0.5) / s  # sample points in pixel units
    dx = grid[None, None, :] - cx[:, None, None].astype(np.float32)  # (n, 1, W)
    dy = grid[None, :, None] - cy[:, None, None].astype(np.float32)  # (n, H, 1)
    c = np.cos(theta)[:, None, None].astype(np.float32)
    sn = np.sin(theta)[:, None, None].astype(np.float32)
    u, v = dx * c + dy * sn, dy * c - dx * sn  # (n, H*s, W*s)
    rr = r[:, None, None].astype(np.float32)
    fine = np.zeros((n, SIZE * s, SIZE * s), dtype=np.float32)
    for k in range(len(CLASSES)):
        idx = np.flatnonzero(y == k)
        if len(idx):
            fine[idx] = _mask(k, u[idx], v[idx], rr[idx])
    return fine.reshape(n, SIZE, s, SIZE, s).mean(axis=(2, 4))  # (n, SIZE, SIZE)


def _backgrounds(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Textured backgrounds (n, 3, SIZE, SIZE) and their base colours (n, 3)."""
    base = rng.uniform(0.15, 0.85, (n, 3)).astype(np.float32)
    # low-frequency texture: a 4x4 random field, upsampled
    coarse = rng.normal(0, TEXTURE, (n, 3, 4, 4)).astype(np.float32)
    texture = coarse.repeat(SIZE // 4, axis=2).repeat(SIZE // 4, axis=3)
    # a linear gradient in a random direction
    angle = rng.uniform(0, 2 * np.pi, n)
    ramp = np.linspace(-1, 1, SIZE, dtype=np.float32)
    grad = (
        np.cos(angle)[:, None, None] * ramp[None, None, :]
        + np.sin(angle)[:, None, None] * ramp[None, :, None]
    )
    amp = rng.uniform(0, GRADIENT, (n, 3, 1, 1)).astype(np.float32)
    bg = base[:, :, None, None] + texture + amp * grad[:, None].astype(np.float32)
    return bg, base


def _clutter(n: int, rng: np.random.Generator) -> np.ndarray:
    """Coverage (n, SIZE, SIZE) of 0-2 thin lines across the image (they may cross the shape)."""
    ys, xs = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    cover = np.zeros((n, SIZE, SIZE), dtype=np.float32)
    count = rng.integers(0, MAX_LINES + 1, n)
    for j in range(MAX_LINES):
        phi = rng.uniform(0, np.pi, n)[:, None, None]
        off = rng.uniform(-SIZE / 2, SIZE / 2, n)[:, None, None]
        width = rng.uniform(0.3, 0.7, n)[:, None, None]
        dist = np.abs((xs - SIZE / 2) * np.cos(phi) + (ys - SIZE / 2) * np.sin(phi) - off)
        line = np.clip(width + 0.5 - dist, 0, 1) * (count > j)[:, None, None]
        cover = np.maximum(cover, line)
    return cover


def generate(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images float32 (n, 3, 32, 32) in [0, 1] and labels int64 (n,), balanced classes."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % len(CLASSES)).astype(np.int64)
    x = np.empty((n, 3, SIZE, SIZE), dtype=np.float32)
    for start in range(0, n, 1024):  # chunks keep the temporaries small
        yc = y[start : start + 1024]
        m = len(yc)
        hard = rng.uniform(0, 1, m) < HARD_FRACTION
        bg, base = _backgrounds(m, rng)
        direction = rng.normal(size=(m, 3)).astype(np.float32)
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        contrast = _draw(CONTRAST, hard, rng)[:, None]
        fg = np.clip(base + direction * contrast, 0, 1)
        cover = _shape_masks(yc, _draw(RADIUS, hard, rng), rng)[:, None]
        img = bg * (1 - cover) + fg[:, :, None, None] * cover
        line_colour = rng.uniform(0, 1, (m, 3, 1, 1)).astype(np.float32)
        lines = _clutter(m, rng)[:, None]
        img = img * (1 - lines) + line_colour * lines
        sigma = _draw(NOISE, hard, rng)[:, None, None, None]
        img += sigma * rng.standard_normal(img.shape, dtype=np.float32)
        x[start : start + m] = np.clip(img, 0, 1)
    return x, y


@TASKS.register("shapes", kind="classification", summary="generated 32x32 RGB shapes, 10 classes")
def shapes() -> Task:
    parts = {}
    for split, n in SPLIT_SIZES.items():
        x, y = generate(n, SPLIT_SEEDS[split])
        parts[split] = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    return Task(
        name="shapes",
        kind="classification",
        train=parts["train"],
        val=parts["val"],
        test=parts["test"],
        num_classes=len(CLASSES),
        input_shape=(3, SIZE, SIZE),
        classes=CLASSES,
        meta={"generator": "slimkit.zoo.tasks.shapes.generate", "seeds": dict(SPLIT_SEEDS)},
    )
