"""Held-out scenes for the automatic segment count: shapes, sizes and layouts that the automatic-K
method was NOT tuned on (it was tuned on ``synthetic.scenes.objects_scene``: 1..7 axis-aligned
rectangles in distinct cells of a 3x3 layout, seeds 0..4).

``heldout_scene(seed)`` draws 1..6 objects, each an ellipse, a convex polygon, a ring or an
L-shape, of area 2%..25% of the picture (log-uniform, so small ones are common), at any position,
painted one over the other in order (so later objects overlap and occlude earlier ones). Seeds of
the held-out set start at ``HELDOUT_SEED0``; nothing in freeseg/ was chosen by looking at them.

``region_count(gt)`` is the count an automatic K should find: the regions (background included)
that cover at least 2% of the 32x32 grid once the ground truth is cut to that grid (each cell
takes its majority label). An object occluded down to less than that does not count.

Features for these scenes come from the same model as the tuned ones:
``synthetic.scenes.scene_features``.
"""

from __future__ import annotations

import math

import torch

HELDOUT_SEED0 = 10_000
"""First seed of the held-out set (the tuned set ``objects_scene`` uses seeds 0..4)."""

SHAPES: tuple[str, ...] = ("ellipse", "polygon", "ring", "lshape")


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _shape_mask(kind: str, area: float, size: int, g: torch.Generator) -> torch.Tensor:
    """`[size,size]` bool: one shape of about `area` pixels, rotated at random, centred anywhere
    in the middle 80% of the picture (a border may cut it, which makes it smaller)."""
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32) + 0.5,
                            torch.arange(size, dtype=torch.float32) + 0.5, indexing="ij")
    aspect = math.exp(_uniform(g, -0.7, 0.7))  # width / height up to 2:1 either way
    angle = _uniform(g, 0.0, math.pi)
    if kind == "ring":
        inner = _uniform(g, 0.35, 0.6)  # inner / outer radius
        outer_area = area / (1.0 - inner * inner)
    else:
        outer_area = area
    b = math.sqrt(outer_area / (math.pi * aspect))  # ellipse semi-axes a = aspect * b, b
    a = aspect * b
    cy, cx = _uniform(g, 0.1 * size, 0.9 * size), _uniform(g, 0.1 * size, 0.9 * size)
    dy, dx = yy - cy, xx - cx
    cos, sin = math.cos(angle), math.sin(angle)
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy  # shape-aligned coordinates
    if kind in ("ellipse", "ring"):
        rho = (u / a) ** 2 + (v / b) ** 2
        mask = rho <= 1.0
        if kind == "ring":
            mask &= rho >= inner * inner
        return mask
    if kind == "lshape":
        # a square of side s with one quarter removed: area 3/4 s^2
        half = 0.5 * math.sqrt(4.0 * area / 3.0)
        return (u.abs() <= half) & (v.abs() <= half) & ~((u > 0) & (v < 0))
    # convex polygon: 3..7 vertices on the ellipse at jittered, increasing angles; a pixel is
    # inside when it is left of every (counter-clockwise) edge
    n = int(torch.randint(3, 8, (1,), generator=g))
    angles = [(j + _uniform(g, -0.35, 0.35)) * 2 * math.pi / n for j in range(n)]
    pts = [(a * math.cos(t), b * math.sin(t)) for t in angles]
    poly_area = 0.5 * abs(sum(p[0] * q[1] - q[0] * p[1] for p, q in zip(pts, pts[1:] + pts[:1])))
    scale = math.sqrt(area / max(poly_area, 1e-6))  # a polygon inscribed in the ellipse is smaller
    pts = [(px * scale, py * scale) for px, py in pts]
    mask = torch.ones(size, size, dtype=torch.bool)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1]):
        mask &= (x1 - x0) * (v - y0) - (y1 - y0) * (u - x0) >= 0
    return mask


def heldout_scene(seed: int, size: int = 256, min_objects: int = 1, max_objects: int = 6,
                  min_area: float = 0.02, max_area: float = 0.25) -> torch.Tensor:
    """`[size,size]` int64 ground truth of one held-out scene: background 0 and objects 1..n
    (n drawn in min_objects..max_objects), each of a random kind in ``SHAPES`` with an area drawn
    log-uniformly in [min_area, max_area] of the picture, at a random position, painted in order
    (later objects cover earlier ones; a border can cut a shape). Labels are renumbered so that
    the ids present are 0..m without gaps (an object hidden entirely disappears)."""
    g = torch.Generator().manual_seed(int(seed))
    n = int(torch.randint(min_objects, max_objects + 1, (1,), generator=g))
    gt = torch.zeros(size, size, dtype=torch.int64)
    for i in range(n):
        kind = SHAPES[int(torch.randint(len(SHAPES), (1,), generator=g))]
        frac = math.exp(_uniform(g, math.log(min_area), math.log(max_area)))
        gt[_shape_mask(kind, frac * size * size, size, g)] = i + 1
    present = torch.unique(gt)
    remap = torch.zeros(n + 1, dtype=torch.int64)
    remap[present] = torch.arange(present.numel())
    return remap[gt]


def grid_labels(gt: torch.Tensor, grid: int = 32) -> torch.Tensor:
    """`[grid,grid]` int64: ground truth `[H,W]` (H, W multiples of grid) cut to the grid, each
    cell taking its majority label (ties: the lower label)."""
    h, w = gt.shape
    if h % grid or w % grid:
        raise ValueError(f"ground truth {h}x{w} is not a multiple of the {grid}x{grid} grid")
    n = int(gt.max()) + 1
    cells = gt.reshape(grid, h // grid, grid, w // grid).permute(0, 2, 1, 3).reshape(grid, grid, -1)
    counts = torch.nn.functional.one_hot(cells, n).sum(dim=2)  # [grid,grid,n]
    return counts.argmax(dim=2)


def counted_regions(gt: torch.Tensor, grid: int = 32, min_fraction: float = 0.02) -> torch.Tensor:
    """`[gt.max()+1]` bool: which labels of `gt` cover at least `min_fraction` of the `grid` x
    `grid` cells of ``grid_labels(gt, grid)`` (an automatic K should find exactly these)."""
    cells = torch.bincount(grid_labels(gt, grid).flatten(), minlength=int(gt.max()) + 1)
    return cells >= min_fraction * grid * grid


def region_count(gt: torch.Tensor, grid: int = 32, min_fraction: float = 0.02) -> int:
    """The number of regions (background included) covering at least `min_fraction` of the
    `grid` x `grid` cells of ``grid_labels(gt, grid)``: what an automatic K should find."""
    return int(counted_regions(gt, grid, min_fraction).sum())


__all__ = ["HELDOUT_SEED0", "SHAPES", "heldout_scene", "grid_labels", "counted_regions", "region_count"]
