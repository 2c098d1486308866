"""Unit tests for freeseg.cluster (cluster_features, labels_to_masks)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from freeseg.cluster import cluster_features, labels_to_masks

METHODS = ["kmeans", "agglomerative"]


def _layout_a() -> torch.Tensor:
    """[32,32] int64 region map with 3 regions, already in canonical (raster first-appearance) order."""
    reg = torch.zeros(32, 32, dtype=torch.int64)
    reg[:, 16:] = 1
    reg[20:, :10] = 2
    return reg


def _layout_b() -> torch.Tensor:
    """[32,32] int64 region map with 3 regions (horizontal bands plus a square), canonical order."""
    reg = torch.zeros(32, 32, dtype=torch.int64)
    reg[8:24, :] = 1
    reg[24:, :] = 2
    reg[2:6, 2:6] = 1
    return reg


def _blobs(layout: torch.Tensor, channels: int = 64, seed: int = 0, spread: float = 5.0,
           noise: float = 0.3) -> torch.Tensor:
    """[C,h,w] float32 features: one well-separated Gaussian blob per region of layout."""
    g = torch.Generator().manual_seed(seed)
    n_regions = int(layout.max()) + 1
    means = torch.randn(n_regions, channels, generator=g) * spread
    h, w = layout.shape
    feats = means[layout] + noise * torch.randn(h, w, channels, generator=g)
    return feats.permute(2, 0, 1).contiguous()


def _same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True if two label maps define the same partition (equal up to a permutation of ids)."""
    a, b = a.flatten(), b.flatten()
    pairs = torch.unique(torch.stack([a, b]), dim=1)
    return pairs.shape[1] == torch.unique(a).numel() == torch.unique(b).numel()


# ----------------------------------------------------------------------------
# cluster_features
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_recovers_regions_exactly(method: str) -> None:
    reg = _layout_a()
    labels = cluster_features(_blobs(reg)[None], 3, method=method)
    assert _same_partition(labels[0], reg)
    assert torch.equal(labels[0], reg)  # canonical order matches the canonical layout


@pytest.mark.parametrize("method", METHODS)
def test_batch_of_two_layouts(method: str) -> None:
    reg_a, reg_b = _layout_a(), _layout_b()
    feats = torch.stack([_blobs(reg_a, seed=1), _blobs(reg_b, seed=2)])
    labels = cluster_features(feats, 3, method=method)
    assert labels.shape == (2, 32, 32)
    assert torch.equal(labels[0], reg_a)
    assert torch.equal(labels[1], reg_b)


@pytest.mark.parametrize("method", METHODS)
def test_output_dtype_shape_device(method: str) -> None:
    feats = torch.randn(2, 8, 6, 5)
    labels = cluster_features(feats, 4, method=method)
    assert labels.shape == (2, 6, 5)
    assert labels.dtype == torch.int64
    assert labels.device == feats.device
    assert int(labels.min()) >= 0 and int(labels.max()) < 4


@pytest.mark.parametrize("method", METHODS)
def test_canonical_order_on_random_features(method: str) -> None:
    feats = torch.randn(1, 16, 12, 12, generator=torch.Generator().manual_seed(3))
    flat = cluster_features(feats, 5, method=method)[0].flatten().tolist()
    assert flat[0] == 0
    firsts = []
    for v in flat:
        if v not in firsts:
            firsts.append(v)
    assert firsts == list(range(len(firsts)))


def test_kmeans_deterministic_for_seed() -> None:
    feats = torch.randn(2, 32, 16, 16, generator=torch.Generator().manual_seed(5))
    a = cluster_features(feats, 6, seed=7)
    b = cluster_features(feats, 6, seed=7)
    assert torch.equal(a, b)


def test_kmeans_image_independent_of_batch_position() -> None:
    feats = torch.randn(2, 32, 16, 16, generator=torch.Generator().manual_seed(6))
    both = cluster_features(feats, 5, seed=1)
    alone = cluster_features(feats[1:], 5, seed=1)
    assert torch.equal(both[1], alone[0])


@pytest.mark.parametrize("seed", [0, 1, 2, 123])
def test_kmeans_other_seeds_still_recover(seed: int) -> None:
    reg = _layout_b()
    labels = cluster_features(_blobs(reg, seed=4)[None], 3, seed=seed, n_init=2)
    assert torch.equal(labels[0], reg)


@pytest.mark.parametrize("method", METHODS)
def test_fp16_input(method: str) -> None:
    reg = _layout_a()
    feats = _blobs(reg)[None].half()
    labels = cluster_features(feats, 3, method=method)
    assert labels.dtype == torch.int64
    assert torch.equal(labels[0], reg)


def test_bfloat16_input() -> None:
    reg = _layout_a()
    labels = cluster_features(_blobs(reg)[None].bfloat16(), 3)
    assert torch.equal(labels[0], reg)


@pytest.mark.parametrize("method", METHODS)
def test_identical_features_more_clusters_than_points(method: str) -> None:
    feats = torch.ones(1, 8, 32, 32)
    labels = cluster_features(feats, 3, method=method)
    assert labels.shape == (1, 32, 32)
    assert labels.dtype == torch.int64
    assert int(labels.min()) >= 0 and int(labels.max()) < 3
    if method == "kmeans":
        assert torch.equal(labels, torch.zeros_like(labels))  # one cluster, two empty


def test_kmeans_fewer_distinct_vectors_than_clusters() -> None:
    reg = torch.zeros(8, 8, dtype=torch.int64)
    reg[4:] = 1
    feats = torch.stack([torch.zeros(4), torch.full((4,), 3.0)])[reg].permute(2, 0, 1)[None]
    labels = cluster_features(feats, 4)
    assert torch.equal(labels[0], reg)


@pytest.mark.parametrize("method", METHODS)
def test_single_cluster(method: str) -> None:
    labels = cluster_features(torch.randn(1, 4, 5, 5), 1, method=method)
    assert torch.equal(labels, torch.zeros(1, 5, 5, dtype=torch.int64))


@pytest.mark.parametrize("method", METHODS)
def test_n_clusters_equal_to_points(method: str) -> None:
    feats = torch.randn(1, 4, 2, 3, generator=torch.Generator().manual_seed(0))
    labels = cluster_features(feats, 6, method=method)
    assert torch.equal(labels[0].flatten(), torch.arange(6))


def test_kmeans_small_n_init_and_max_iter() -> None:
    reg = _layout_a()
    labels = cluster_features(_blobs(reg)[None], 3, n_init=1, max_iter=1)
    assert labels.shape == (1, 32, 32)
    assert int(labels.max()) < 3


def test_kmeans_batched_restarts_equal_each_restart_alone() -> None:
    from freeseg.cluster import _kmeans_pp, _lloyd, _Points

    x = torch.randn(200, 300, generator=torch.Generator().manual_seed(8))
    points = _Points(x - x.mean(dim=0, keepdim=True))
    seeds = _kmeans_pp(points, 5, 6, torch.Generator().manual_seed(0))
    labels, inertia = _lloyd(points, seeds, 300, 1e-6)
    for i in range(6):
        alone, alone_inertia = _lloyd(points, seeds[i:i + 1], 300, 1e-6)
        assert torch.equal(alone[0], labels[i])
        assert torch.allclose(alone_inertia[0], inertia[i], rtol=1e-5)


def test_kmeans_gram_and_feature_paths_agree() -> None:
    from freeseg.cluster import _kmeans_pp, _lloyd, _Points

    reg = _layout_b()
    x = _blobs(reg, channels=2048).reshape(2048, -1).T  # 1024 points <= 2048 dims: Gram path
    x = x - x.mean(dim=0, keepdim=True)
    gram = _Points(x)
    plain = _Points(x)
    plain.gram, plain.sq = None, (x * x).sum(dim=1)
    assert gram.gram is not None
    seeds = _kmeans_pp(gram, 3, 4, torch.Generator().manual_seed(1))
    assert torch.equal(seeds, _kmeans_pp(plain, 3, 4, torch.Generator().manual_seed(1)))
    lab_g, in_g = _lloyd(gram, seeds, 300, 1e-6)
    lab_p, in_p = _lloyd(plain, seeds, 300, 1e-6)
    assert torch.equal(lab_g, lab_p)
    assert torch.allclose(in_g, in_p, rtol=1e-4)
    assert _same_partition(lab_g[int(in_g.argmin())], reg.flatten())


def test_kmeans_inertia_matches_sklearn() -> None:
    from sklearn.cluster import KMeans

    x = torch.randn(1, 512, 16, 16, generator=torch.Generator().manual_seed(9)).cumsum(dim=2)
    pts = x[0].reshape(512, -1).T.double()
    ours = cluster_features(x, 4, seed=0)[0].flatten()
    theirs = torch.from_numpy(KMeans(4, n_init=10, random_state=0).fit(pts.numpy()).labels_).long()

    def inertia(lab: torch.Tensor) -> float:
        return sum(float(((pts[lab == k] - pts[lab == k].mean(0)) ** 2).sum()) for k in lab.unique())

    assert inertia(ours) <= inertia(theirs) * 1.001


def test_error_bad_shape() -> None:
    with pytest.raises(ValueError, match=r"features must be \[B,C,h,w\], got shape \(8, 4, 4\)"):
        cluster_features(torch.randn(8, 4, 4), 2)


def test_error_integer_features() -> None:
    with pytest.raises(ValueError, match="features"):
        cluster_features(torch.ones(1, 2, 4, 4, dtype=torch.int64), 2)


def test_error_too_many_clusters() -> None:
    with pytest.raises(ValueError, match=r"n_clusters \(17\).*4\*4=16"):
        cluster_features(torch.randn(1, 3, 4, 4), 17)


@pytest.mark.parametrize("bad", [-1, -3])  # 0 = automatic (tests/unit/test_cluster_beyond.py)
def test_error_n_clusters_below_one(bad: int) -> None:
    with pytest.raises(ValueError, match="n_clusters"):
        cluster_features(torch.randn(1, 3, 4, 4), bad)


def test_error_unknown_method() -> None:
    with pytest.raises(ValueError, match="kmeans.*agglomerative.*'spectral'"):
        cluster_features(torch.randn(1, 3, 4, 4), 2, method="spectral")


@pytest.mark.parametrize("arg", ["n_init", "max_iter"])
def test_error_bad_iteration_counts(arg: str) -> None:
    with pytest.raises(ValueError, match=arg):
        cluster_features(torch.randn(1, 3, 4, 4), 2, **{arg: 0})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kmeans_cuda_matches_cpu() -> None:
    reg = _layout_b()
    feats = _blobs(reg)[None]
    cpu = cluster_features(feats, 3, seed=3)
    gpu = cluster_features(feats.cuda(), 3, seed=3)
    assert gpu.device.type == "cuda"
    assert torch.equal(gpu.cpu(), cpu)


# ----------------------------------------------------------------------------
# labels_to_masks
# ----------------------------------------------------------------------------

def test_masks_hand_built_upsampling() -> None:
    labels = torch.tensor([[[0, 1], [2, 0]]])
    masks = labels_to_masks(labels, (4, 6))
    expected_labels = torch.tensor([
        [0, 0, 0, 1, 1, 1],
        [0, 0, 0, 1, 1, 1],
        [2, 2, 2, 0, 0, 0],
        [2, 2, 2, 0, 0, 0],
    ])
    assert masks.shape == (1, 3, 4, 6)
    assert masks.dtype == torch.float32
    for k in range(3):
        assert torch.equal(masks[0, k], (expected_labels == k).float())


@pytest.mark.parametrize("size", [(1, 1), (3, 3), (5, 7), (33, 17), (8, 10), (100, 3)])
def test_masks_match_interpolate_nearest_exact(size: tuple[int, int]) -> None:
    labels = torch.randint(0, 4, (2, 4, 5), generator=torch.Generator().manual_seed(0))
    masks = labels_to_masks(labels, size, n_clusters=4)
    ref = F.interpolate(labels[:, None].float(), size=size, mode="nearest-exact")[:, 0].long()
    assert masks.shape == (2, 4) + size
    assert torch.equal(masks.argmax(dim=1), ref)


@pytest.mark.parametrize("size", [(7, 5), (64, 64), (31, 45)])
def test_masks_binary_and_partition(size: tuple[int, int]) -> None:
    labels = torch.randint(0, 5, (3, 8, 8), generator=torch.Generator().manual_seed(1))
    masks = labels_to_masks(labels, size)
    assert masks.dtype == torch.float32
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(masks.sum(dim=1), torch.ones(3, *size))


def test_masks_empty_cluster_is_zero() -> None:
    labels = torch.tensor([[[0, 2], [2, 0]]])
    masks = labels_to_masks(labels, (4, 4))
    assert masks.shape == (1, 3, 4, 4)
    assert float(masks[0, 1].sum()) == 0.0
    assert torch.equal(masks.sum(dim=1), torch.ones(1, 4, 4))


def test_masks_n_clusters_larger_than_max_label() -> None:
    labels = torch.tensor([[[0, 1], [1, 0]]])
    masks = labels_to_masks(labels, (2, 2), n_clusters=5)
    assert masks.shape == (1, 5, 2, 2)
    assert float(masks[0, 2:].sum()) == 0.0
    assert torch.equal(masks[0, 0], torch.tensor([[1.0, 0.0], [0.0, 1.0]]))


def test_masks_downsampling_and_identity() -> None:
    labels = torch.randint(0, 3, (1, 6, 6), generator=torch.Generator().manual_seed(2))
    same = labels_to_masks(labels, (6, 6), n_clusters=3)
    assert torch.equal(same.argmax(dim=1), labels)
    small = labels_to_masks(labels, (3, 2), n_clusters=3)
    assert small.shape == (1, 3, 3, 2)
    assert torch.equal(small.sum(dim=1), torch.ones(1, 3, 2))


def test_masks_from_cluster_features() -> None:
    labels = cluster_features(_blobs(_layout_a())[None], 3)
    masks = labels_to_masks(labels, (512, 512), n_clusters=3)
    assert masks.shape == (1, 3, 512, 512)
    assert torch.equal(masks.sum(dim=1), torch.ones(1, 512, 512))


def test_masks_error_bad_shape() -> None:
    with pytest.raises(ValueError, match=r"labels must be \[B,h,w\]"):
        labels_to_masks(torch.zeros(4, 4, dtype=torch.int64), (8, 8))


def test_masks_error_float_labels() -> None:
    with pytest.raises(ValueError, match="integer"):
        labels_to_masks(torch.zeros(1, 4, 4), (8, 8))


def test_masks_error_n_clusters_too_small() -> None:
    with pytest.raises(ValueError, match="n_clusters"):
        labels_to_masks(torch.tensor([[[0, 3]]]), (2, 2), n_clusters=3)


def test_masks_error_negative_label() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        labels_to_masks(torch.tensor([[[0, -1]]]), (2, 2))


@pytest.mark.parametrize("size", [(0, 4), (4,), (4.0, 4), 4])
def test_masks_error_bad_size(size: tuple) -> None:
    with pytest.raises(ValueError, match="size"):
        labels_to_masks(torch.zeros(1, 2, 2, dtype=torch.int64), size)
