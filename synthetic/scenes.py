"""Synthetic pictures and scenes with known ground truth: `write_test_image` (a small picture
for the server tests and benchmarks) and feature scenes for the beyond-the-paper options (auto
K, instances, shared batch clustering, fine grids), used by tests/unit and bench/bench_beyond.py.

No diffusion model is involved: feature grids are built directly. Each segment (object class)
gets a random feature vector per UNet block; a block's feature map is the per-pixel vector
field average-pooled to the block's token grid (as a UNet block sees a pixel region per token),
plus Gaussian noise; the grid FreeSeg-Diff clusters is those maps bilinearly resized to the
grid and concatenated, exactly as ``freeseg.features.aggregate_maps`` does.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from freeseg.features import aggregate_maps


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _rect(gt: torch.Tensor, value: int, y0: int, x0: int, hh: int, ww: int) -> None:
    gt[y0:y0 + hh, x0:x0 + ww] = value


def objects_scene(n_objects: int, size: int = 256, seed: int = 0) -> torch.Tensor:
    """`[size,size]` int64 ground truth: background 0 and `n_objects` non-overlapping rectangles
    labelled 1..n (each at least size/6 on a side)."""
    g = _gen(seed)
    gt = torch.zeros(size, size, dtype=torch.int64)
    cells = 3  # place objects in distinct cells of a 3x3 layout, so none is hidden
    order = torch.randperm(cells * cells, generator=g)[:n_objects].tolist()
    step = size // cells
    for i, cell in enumerate(order):
        cy, cx = divmod(cell, cells)
        hh, ww = (torch.randint(step // 2, step - 2, (2,), generator=g)).tolist()
        y0 = cy * step + int(torch.randint(0, step - hh, (1,), generator=g))
        x0 = cx * step + int(torch.randint(0, step - ww, (1,), generator=g))
        _rect(gt, i + 1, y0, x0, hh, ww)
    return gt


def instances_scene(n_instances: int, size: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(`[size,size]` class map: 0 background, 1 = every instance of one class;
    `[size,size]` instance map: 0 background, 1..n each instance), instances in distinct cells."""
    inst = objects_scene(n_instances, size, seed)
    return (inst > 0).long(), inst


def moving_scene(n_frames: int, n_objects: int = 3, size: int = 256, seed: int = 0) -> torch.Tensor:
    """`[T,size,size]` int64: `n_objects` rectangles (ids 1..n) moving across a background,
    crossing one another's raster order over the clip (later ids painted on top)."""
    g = _gen(seed)
    frames = torch.zeros(n_frames, size, size, dtype=torch.int64)
    starts = torch.randint(0, size * 3 // 4, (n_objects, 2), generator=g).float()
    speed = (torch.rand(n_objects, 2, generator=g) - 0.5) * size / max(n_frames, 1)
    side = size // 5
    for t in range(n_frames):
        for i in range(n_objects):
            y0, x0 = ((starts[i] + t * speed[i]) % (size - side)).long().tolist()
            _rect(frames[t], i + 1, y0, x0, side, side)
    return frames


def thin_scene(size: int = 512, seed: int = 0) -> torch.Tensor:
    """`[size,size]` int64: background 0, a large object 1, thin bars (class 2: poles / wires,
    2..size/64 px wide) and a thin frame (class 3), the thin structures a 32x32 grid misses."""
    g = _gen(seed)
    gt = torch.zeros(size, size, dtype=torch.int64)
    s = size
    y0, x0 = (torch.randint(s // 8, s // 3, (2,), generator=g)).tolist()
    _rect(gt, 1, y0, x0, s // 3, s // 3)
    for j in range(4):
        width = int(torch.randint(2, max(3, s // 64) + 1, (1,), generator=g))
        x = int(torch.randint(0, s - width, (1,), generator=g))
        _rect(gt, 2, 0, x, s, width)
        if j % 2:
            y = int(torch.randint(0, s - width, (1,), generator=g))
            _rect(gt, 2, y, 0, width, s)
    fy, fx = (torch.randint(s // 2, s * 3 // 4, (2,), generator=g)).tolist()
    side, t = s // 5, max(2, s // 100)
    _rect(gt, 3, fy, fx, side, t)
    _rect(gt, 3, fy, fx, t, side)
    _rect(gt, 3, fy + side - t, fx, t, side)
    _rect(gt, 3, fy, fx + side - t, side, t)
    return gt


def block_features(gt: torch.Tensor, tokens: int, channels: int, seed: int, noise: float = 0.3,
                   class_vectors: torch.Tensor | None = None) -> torch.Tensor:
    """`[B,C,tokens,tokens]` float32: one UNet-like block's map of ground truth `gt` (`[H,W]` or
    `[B,H,W]`): each class's random vector (shared across the batch; or `class_vectors`
    `[n_classes,C]`) average-pooled to `tokens` x `tokens`, plus N(0, noise^2) per token."""
    g = _gen(seed)
    labels = gt[None] if gt.ndim == 2 else gt
    n = int(labels.max()) + 1
    vectors = torch.randn(max(n, 1), channels, generator=g) if class_vectors is None else class_vectors
    field = vectors[labels].permute(0, 3, 1, 2)  # [B,C,H,W]
    pooled = F.adaptive_avg_pool2d(field, tokens)
    return pooled + noise * torch.randn(pooled.shape, generator=g)


def scene_features(gt: torch.Tensor, grid: int = 32, blocks: tuple[tuple[int, int], ...] = ((16, 64),) * 5,
                   seed: int = 0, noise: float = 0.3) -> torch.Tensor:
    """`[B,sum C,grid,grid]` float32: the maps of `blocks` ((tokens, channels) each; default the
    paper's five 16x16 query blocks, 64 channels instead of 1280) resized to `grid` and
    concatenated (``aggregate_maps``)."""
    maps = [block_features(gt, tokens, channels, seed * 1000 + j, noise) for j, (tokens, channels) in
            enumerate(blocks)]
    return aggregate_maps(maps, (grid, grid))


def scene_image(gt: torch.Tensor, seed: int = 0, noise: float = 0.04) -> torch.Tensor:
    """`[B,H,W,3]` float 0..1: one random colour per class plus noise (the CRF's guide image)."""
    g = _gen(seed + 7)
    labels = gt[None] if gt.ndim == 2 else gt
    colours = torch.rand(int(labels.max()) + 1, 3, generator=g)
    img = colours[labels] + noise * torch.randn((*labels.shape, 3), generator=g)
    return img.clamp(0, 1)


def matched_miou(pred: torch.Tensor, gt: torch.Tensor, classes: torch.Tensor | None = None) -> float:
    """mIoU over the ground-truth classes of `gt` `[H,W]` after mapping each predicted segment of
    `pred` `[H,W]` to the class it overlaps most (the usual matching for class-agnostic masks).
    `classes` (`[n_classes]` bool, optional) restricts the mean to the classes marked True."""
    pred, gt = pred.flatten().long(), gt.flatten().long()
    n_p, n_g = int(pred.max()) + 1, int(gt.max()) + 1
    joint = torch.bincount(pred * n_g + gt, minlength=n_p * n_g).reshape(n_p, n_g)
    mapped = joint.argmax(dim=1)[pred]
    ious = []
    for c in range(n_g):
        inter = int(((mapped == c) & (gt == c)).sum())
        union = int(((mapped == c) | (gt == c)).sum())
        if int((gt == c).sum()) and (classes is None or bool(classes[c])):
            ious.append(inter / union)
    return sum(ious) / len(ious)


def write_test_image(path: str, width: int, height: int, seed: int = 0, mode: str = "RGB") -> str:
    """A synthetic picture: a few flat-coloured shapes on a gradient, saved as PNG."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack([xx / max(width - 1, 1), yy / max(height - 1, 1), np.full_like(xx, 0.3, float)], -1)
    for _ in range(3):
        cx, cy = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height
        r = rng.uniform(0.1, 0.25) * min(width, height)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.uniform(0, 1, 3)
    pil = Image.fromarray((img * 255).astype(np.uint8))
    if mode != "RGB":
        pil = pil.convert(mode)
    pil.save(path)
    return path
