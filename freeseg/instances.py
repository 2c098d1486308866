"""Instances: split each named mask into its connected parts (two dogs -> two masks).

Public API:
    components(mask, min_area) -> [N,H,W] float32 parts of one mask, largest first
    split_instances(segments, min_area) -> Segments with one entry per part of every named mask

A part is an 8-connected region of the mask's pixels above 0.5 (scipy.ndimage.label). Parts
smaller than ``min_area`` (a fraction of the image's pixels, 0..0.5) are specks and are dropped, except
that a mask always keeps its largest part, so no named segment disappears. A soft mask (e.g.
from the guided filter) keeps its soft values: each pixel with a value above 0 goes to the
part nearest to it (Euclidean distance transform), and pixels nearest to a dropped speck
are cleared. Cost: one labelling and one distance transform per named mask, O(H*W) each.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from scipy import ndimage

from .segments import Segments
from .settings import FLOAT_RANGES

EIGHT = np.ones((3, 3), dtype=bool)


def _check_min_area(min_area: float) -> float:
    """``min_area`` as a float; ValueError unless in ``freeseg.settings.FLOAT_RANGES["min_area"]``
    (the one range of the setting, the node input's too)."""
    low, high = FLOAT_RANGES["min_area"]
    if isinstance(min_area, bool) or not isinstance(min_area, (int, float)) or not low <= float(min_area) <= high:
        raise ValueError(f"min_area must be a number in {low}..{high}, got {min_area!r}")
    return float(min_area)


def components(mask: torch.Tensor, min_area: float = 0.002) -> torch.Tensor:
    """The connected parts of one mask.

    Args:
        mask: `[H,W]` float 0..1 (binary or soft).
        min_area: parts with fewer than ``min_area * H * W`` pixels are dropped (the largest
            part is always kept).
    Returns:
        `[N,H,W]` float32 (CPU), largest part first (ties: first in raster order); N = 0 for
        an empty mask. Their sum equals the mask minus the dropped specks.
    """
    min_area = _check_min_area(min_area)
    if mask.ndim != 2:
        raise ValueError(f"mask must be [H,W], got {tuple(mask.shape)}")
    soft = mask.detach().float().cpu().numpy()
    core = soft > 0.5
    lab, n = ndimage.label(core, structure=EIGHT)
    if n == 0:
        return torch.zeros((0, *soft.shape), dtype=torch.float32)
    areas = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    order = np.argsort(-areas, kind="stable")  # label ids are in raster order of first pixel
    keep = [int(i) + 1 for i in order if areas[i] >= min_area * soft.size or i == order[0]]
    if n == 1:
        owner = lab
    else:  # every pixel of the mask goes to its nearest part
        _, (iy, ix) = ndimage.distance_transform_edt(lab == 0, return_indices=True)
        owner = lab[iy, ix]
    owner = np.where(soft > 0, owner, 0)
    parts = [np.where(owner == j, soft, 0.0) for j in keep]
    return torch.from_numpy(np.stack(parts).astype(np.float32))


def split_instances(segments: Segments, min_area: float = 0.002) -> Segments:
    """One entry per connected part of every named mask, in mask order (the parts of mask k
    take its place, largest first), with the same label and score and ``instances`` set to
    the part's index; unnamed masks are kept whole (instance None).

    Images with fewer entries than the longest image are padded with all-zero unnamed masks,
    so ``masks`` stays `[B,K',H,W]` float32.
    """
    min_area = _check_min_area(min_area)
    b = segments.batch_size
    h, w = segments.image_size
    rows: list[tuple[list[torch.Tensor], list[Optional[str]], list[float], list[Optional[int]]]] = []
    for i in range(b):
        masks, labels, scores, inst = [], [], [], []
        for k, name in enumerate(segments.labels[i]):
            m = segments.masks[i, k]
            parts = components(m, min_area) if name is not None else m[None]
            if name is not None and parts.shape[0] == 0:
                parts = m[None].float()  # an empty named mask stays one (empty) entry
            for j in range(parts.shape[0]):
                masks.append(parts[j])
                labels.append(name)
                scores.append(segments.scores[i][k])
                inst.append(j if name is not None else None)
        rows.append((masks, labels, scores, inst))
    k_out = max((len(r[0]) for r in rows), default=0)
    out = torch.zeros((b, k_out, h, w), dtype=torch.float32)
    for i, (masks, labels, scores, inst) in enumerate(rows):
        if masks:
            out[i, :len(masks)] = torch.stack(masks)
        pad = k_out - len(masks)
        labels += [None] * pad
        scores += [0.0] * pad
        inst += [None] * pad
    return Segments(out, [r[1] for r in rows], [r[2] for r in rows], [list(c) for c in segments.class_names],
                    [r[3] for r in rows], segments.shared)


__all__ = ["components", "split_instances"]
