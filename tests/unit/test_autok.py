"""Automatic K (n_clusters=0: over-segment, then merge) on scenes it was not tuned on
(synthetic/heldout.py), and the rule that says what the right count is."""
from __future__ import annotations

import statistics

import pytest
import torch

from freeseg.cluster import auto_cluster_features, labels_to_masks
from synthetic.heldout import HELDOUT_SEED0, counted_regions, grid_labels, heldout_scene, region_count
from synthetic.scenes import matched_miou, scene_features

PAPER_BLOCKS = ((16, 64),) * 5


def test_region_count_rule() -> None:
    gt = torch.zeros(256, 256, dtype=torch.int64)  # 32x32 grid of 8x8 px cells
    gt[0:24, 0:56] = 1  # 3 x 7 = 21 cells: 2.05% of the grid, counts
    gt[64:104, 0:32] = 2  # 5 x 4 = 20 cells: 1.95%, does not count
    for x in range(64, 256, 8):  # 3 px of every cell of 8 rows: never a cell's majority
        gt[128:192, x:x + 3] = 3
    assert torch.equal(torch.bincount(grid_labels(gt).flatten(), minlength=4), torch.tensor([983, 21, 20, 0]))
    assert counted_regions(gt).tolist() == [True, True, False, False]
    assert region_count(gt) == 2
    assert region_count(gt, min_fraction=0.019) == 3
    with pytest.raises(ValueError, match="multiple"):
        grid_labels(torch.zeros(100, 100, dtype=torch.int64))


def test_heldout_scenes() -> None:
    a, b = heldout_scene(HELDOUT_SEED0), heldout_scene(HELDOUT_SEED0)
    assert torch.equal(a, b) and a.shape == (256, 256)
    scenes = [heldout_scene(HELDOUT_SEED0 + i) for i in range(20)]
    counts = [region_count(gt) for gt in scenes]
    assert min(counts) >= 2 and max(counts) <= 7 and len(set(counts)) >= 5
    for gt in scenes:
        ids = torch.unique(gt)
        assert torch.equal(ids, torch.arange(ids.numel()))  # no gaps, background 0


def _two_halves(small: int) -> torch.Tensor:
    """[1,24,32,32] features: regions A (left) and B (right) with a 2-column band of A/B blends
    between them (what a UNet token straddling the edge sees), and a small object C of
    small x small cells inside A; plus a little noise."""
    g = torch.Generator().manual_seed(0)
    means = torch.randn(3, 24, generator=g) * 3
    reg = torch.zeros(32, 32, dtype=torch.int64)
    reg[:, 16:] = 1
    reg[4:4 + small, 4:4 + small] = 2
    feats = means[reg]
    feats[:, 15:17] = 0.5 * (means[0] + means[1])
    feats = feats + 0.2 * torch.randn(feats.shape, generator=g)
    return feats.permute(2, 0, 1)[None].contiguous()


def test_boundary_blends_merge_and_small_objects_stay() -> None:
    labels, chosen = auto_cluster_features(_two_halves(5), max_clusters=8, n_init=3)  # C: 25 cells, 2.4%
    assert chosen == [3]
    lab = labels[0]
    assert int(lab[6, 6]) != int(lab[6, 10]) != int(lab[6, 25])
    assert set(lab[:, 15:17].flatten().tolist()) <= {int(lab[0, 0]), int(lab[0, 31])}  # band joined A or B
    _, chosen = auto_cluster_features(_two_halves(4), max_clusters=8, n_init=3)  # C: 16 cells, 1.6%
    assert chosen == [2]
    _, capped = auto_cluster_features(_two_halves(5), max_clusters=2, n_init=3)
    assert capped == [2]


def test_auto_k_on_heldout_scenes() -> None:
    """30 held-out scenes (1..6 ellipses, polygons, rings, L-shapes; overlaps; noise 0.5): the
    right count in >= 80% and matched mIoU >= 0.80 with nearest upsampling."""
    right, mious = 0, []
    for seed in range(HELDOUT_SEED0, HELDOUT_SEED0 + 30):
        gt = heldout_scene(seed)
        feats = scene_features(gt, 32, PAPER_BLOCKS, seed=seed, noise=0.5)
        labels, chosen = auto_cluster_features(feats, max_clusters=8, n_init=3)
        right += chosen[0] == region_count(gt)
        pred = labels_to_masks(labels, (256, 256)).argmax(dim=1)[0]
        mious.append(matched_miou(pred, gt, counted_regions(gt)))
    assert right / 30 >= 0.8
    assert statistics.mean(mious) >= 0.80
