"""Beyond the paper, clustering level: automatic K, K from the class list, one clustering for a
batch (freeseg.cluster + freeseg.stages.cluster_segments), on synthetic feature grids built
directly (per-region random vectors + noise), so the right answer is known."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from freeseg.cluster import adaptive_n_clusters, auto_cluster_features, cluster_features, cluster_features_shared
from freeseg.features import DiffusionFeatures
from freeseg.stages import cluster_segments


def _regions(k: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """[size,size] int64 map with k vertical bands of random widths (k >= 1), canonical order."""
    g = np.random.default_rng(seed)
    cuts = np.sort(g.choice(np.arange(2, size - 1), size=k - 1, replace=False)) if k > 1 else np.array([], int)
    reg = torch.zeros(size, size, dtype=torch.int64)
    for j, c in enumerate(cuts):
        reg[:, int(c):] = j + 1
    return reg


def _features(reg: torch.Tensor, channels: int = 24, noise: float = 0.3, seed: int = 0,
              means: torch.Tensor | None = None) -> torch.Tensor:
    """[C,h,w] float32: one random vector (norm ~ 5 sqrt(C)) per region of reg plus noise."""
    g = torch.Generator().manual_seed(seed)
    if means is None:
        means = torch.randn(int(reg.max()) + 1, channels, generator=g) * 5
    feats = means[reg] + noise * torch.randn(*reg.shape, means.shape[1], generator=g)
    return feats.permute(2, 0, 1).contiguous()


def _same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.flatten(), b.flatten()
    pairs = torch.unique(torch.stack([a, b]), dim=1)
    return pairs.shape[1] == torch.unique(a).numel() == torch.unique(b).numel()


@pytest.mark.parametrize("k", [2, 3, 4, 5, 6])
def test_auto_k_finds_the_true_count(k: int) -> None:
    reg = _regions(k, seed=k)
    labels, chosen = auto_cluster_features(_features(reg, seed=k)[None], max_clusters=8, n_init=3)
    assert chosen == [k]
    assert torch.equal(labels[0], reg)


def test_n_clusters_zero_is_auto_per_image() -> None:
    regs = [_regions(2, seed=0), _regions(5, seed=1)]
    feats = torch.stack([_features(r, seed=i) for i, r in enumerate(regs)])
    labels = cluster_features(feats, 0, max_clusters=6, n_init=3)
    auto, chosen = auto_cluster_features(feats, 6, n_init=3)
    assert chosen == [2, 5]
    assert torch.equal(labels, auto)
    assert torch.equal(labels[0], regs[0]) and torch.equal(labels[1], regs[1])


def test_auto_k_is_capped_by_max_clusters_and_points() -> None:
    reg = _regions(6, seed=3)
    _, chosen = auto_cluster_features(_features(reg, seed=3)[None], max_clusters=3, n_init=2)
    assert chosen[0] <= 3
    _, tiny = auto_cluster_features(torch.randn(1, 4, 1, 2), max_clusters=8)
    assert tiny == [2]
    _, one = auto_cluster_features(torch.randn(2, 4, 1, 1), max_clusters=8)
    assert one == [1, 1]


@pytest.mark.parametrize("bad", [1, 0, -2, True, 2.5])
def test_auto_k_refuses_bad_max_clusters(bad) -> None:
    with pytest.raises(ValueError, match="max_clusters"):
        auto_cluster_features(torch.randn(1, 4, 4, 4), max_clusters=bad)


@pytest.mark.parametrize("name, bad", [("min_fraction", 1.0), ("min_fraction", -0.1), ("min_fraction", True),
                                       ("merge_ratio", -1.0), ("merge_ratio", "1")])
def test_auto_k_refuses_bad_merge_knobs(name: str, bad) -> None:
    with pytest.raises(ValueError, match=name):
        auto_cluster_features(torch.randn(1, 4, 4, 4), **{name: bad})


def test_adaptive_n_clusters() -> None:
    assert adaptive_n_clusters(3, 1) == 4
    assert adaptive_n_clusters(0, 1) == 1
    assert adaptive_n_clusters(0, 0) == 1
    assert adaptive_n_clusters(5, -2) == 3
    assert adaptive_n_clusters(10, 1, limit=8) == 8
    with pytest.raises(ValueError):
        adaptive_n_clusters(-1, 1)
    with pytest.raises(ValueError):
        adaptive_n_clusters(2, 1.5)


def _moving(frames: int = 3):
    """Three regions whose raster order changes from frame to frame: [T,16,16] int64 ids 0..2
    (the same id = the same object in every frame)."""
    maps = []
    for t in range(frames):
        reg = torch.zeros(16, 16, dtype=torch.int64)
        reg[:, 5 + t:9 + t] = 1  # object 1 moves right
        reg[:8, 12 - 4 * t: 15 - 4 * t] = 2  # object 2 moves left, passing object 1
        if t == 2:
            reg[0, 0] = 2  # object 2 touches the first pixel in the last frame
        maps.append(reg)
    return torch.stack(maps)


def test_shared_clustering_keeps_indices_across_frames() -> None:
    gt = _moving()
    g = torch.Generator().manual_seed(4)
    means = torch.randn(3, 24, generator=g) * 5
    feats = torch.stack([_features(gt[t], means=means, seed=t) for t in range(gt.shape[0])])
    own = cluster_features(feats, 3, n_init=3)
    shared = cluster_features_shared(feats, 3, n_init=3)
    assert shared.shape == gt.shape
    assert torch.equal(shared, gt)  # canonical over the batch; object ids match frame 0's order
    # frame by frame, canonical order renumbers: object 2 takes label 0 in the last frame
    assert not torch.equal(own, gt)
    assert all(_same_partition(own[t], gt[t]) for t in range(gt.shape[0]))


def test_shared_auto_k_uses_all_frames() -> None:
    gt = _moving()
    means = torch.randn(3, 24, generator=torch.Generator().manual_seed(5)) * 5
    feats = torch.stack([_features(gt[t], means=means, seed=t) for t in range(gt.shape[0])])
    assert torch.equal(cluster_features_shared(feats, 0, n_init=3, max_clusters=5), gt)


def _dfeatures(feats: torch.Tensor, size=(32, 32)) -> DiffusionFeatures:
    return DiffusionFeatures(feats.half(), size, "SD15", "cross_attn_queries", 0, 512)


def test_cluster_segments_auto_and_per_image_counts_pad_with_empty_masks() -> None:
    regs = [_regions(2, seed=0), _regions(4, seed=1)]
    feats = _dfeatures(torch.stack([_features(r, seed=i) for i, r in enumerate(regs)]))
    seg = cluster_segments(feats, 0, n_init=2, max_clusters=6)
    assert seg.masks.shape == (2, 4, 32, 32) and not seg.shared
    assert seg.masks[0, 2:].sum() == 0 and (seg.masks[1].flatten(1).amax(1) == 1).all()
    assert torch.equal(seg.masks.sum(dim=1), torch.ones(2, 32, 32))
    fixed = cluster_segments(feats, [3, 2], n_init=2)
    assert fixed.masks.shape == (2, 3, 32, 32) and fixed.masks[1, 2].sum() == 0
    with pytest.raises(ValueError, match="2 images"):
        cluster_segments(feats, [3], n_init=2)


def test_cluster_segments_shared() -> None:
    gt = _moving()
    means = torch.randn(3, 24, generator=torch.Generator().manual_seed(4)) * 5
    feats = _dfeatures(torch.stack([_features(gt[t], means=means, seed=t) for t in range(3)]), size=(16, 16))
    seg = cluster_segments(feats, 3, n_init=3, shared=True)
    assert seg.shared and seg.masks.shape == (3, 3, 16, 16)
    assert torch.equal(seg.masks.argmax(dim=1), gt)
    assert seg.with_masks(seg.masks).shared
    with pytest.raises(ValueError, match="one n_clusters"):
        cluster_segments(feats, [3, 3, 3], shared=True)

