"""Class-agnostic masks from diffusion features (FreeSeg-Diff, arXiv 2403.20105).

The UNet feature map of each image (`[C,h,w]`, e.g. 32x32) is treated as h*w
points of dimension C and clustered into `n_clusters` groups; the label map is
then upsampled with nearest-neighbour to the image size and split into one
binary mask per cluster.

Public API:
    cluster_features(features, n_clusters, method, seed, n_init, max_iter)
        [B,C,h,w] float -> [B,h,w] int64 labels
    labels_to_masks(labels, size, n_clusters)
        [B,h,w] int64 -> [B,K,H,W] float32 masks in {0,1}

k-means runs in torch on the features' device. Its k-means++ initialisation
draws its random numbers from a CPU `torch.Generator` seeded with `seed`, so a
given seed picks the same initial points on CPU and GPU. Each image of a batch
gets a fresh generator seeded with `seed`, so an image's labels do not depend
on its position in the batch.

Empty clusters: after each assignment step, a cluster that lost all its points
is re-seeded at the point farthest from its current centre (as sklearn does).
Only points farther than 1e-6 * mean(||x||^2) (squared distance, raw features)
from their centre are used, which ignores float32 rounding noise; when there is
no such point (the image has fewer distinct feature vectors than `n_clusters`),
the cluster stays empty.

Labels are returned in canonical order: clusters are renumbered by first
appearance in raster (row-major) order, so label 0 is the cluster of pixel
(0,0); empty clusters take the highest labels.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

METHODS: tuple[str, ...] = ("kmeans", "agglomerative")


# ----------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------

def _check_features(features: torch.Tensor, n_clusters: int) -> None:
    """Raise ValueError unless features is a float [B,C,h,w] tensor with h*w >= n_clusters >= 1."""
    if not isinstance(features, torch.Tensor):
        raise ValueError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if features.dim() != 4:
        raise ValueError(f"features must be [B,C,h,w], got shape {tuple(features.shape)}")
    if not features.is_floating_point():
        raise ValueError(f"features must be a floating-point tensor, got dtype {features.dtype}")
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, int) or n_clusters < 1:
        raise ValueError(f"n_clusters must be an int >= 1, got {n_clusters!r}")
    _, c, h, w = features.shape
    if c < 1:
        raise ValueError(f"features must have at least one channel, got shape {tuple(features.shape)}")
    if h * w < n_clusters:
        raise ValueError(
            f"n_clusters ({n_clusters}) must be <= h*w of features ({h}*{w}={h * w})")


def _check_positive_int(name: str, value: int) -> None:
    """Raise ValueError unless value is an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


# ----------------------------------------------------------------------------
# k-means (torch)
# ----------------------------------------------------------------------------

def _sq_dists(x: torch.Tensor, x_sq: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances via ||x||^2 - 2 x.c + ||c||^2.

    x: [N,C] float32, x_sq: [N] float32 (row norms squared), centers: [K,C] float32.
    Returns [N,K] float32, clamped at 0.
    """
    c_sq = (centers * centers).sum(dim=1)
    d = x_sq[:, None] - 2.0 * (x @ centers.T) + c_sq[None, :]
    return d.clamp_min_(0.0)


def _sample_by_weight(weights: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """Draw n indices with probability proportional to weights (uniform if all are 0).

    weights: [N] float (>= 0), on any device. The uniform numbers come from the
    CPU generator and are moved to weights' device. Returns [n] int64 on that device.
    """
    u = torch.rand(n, generator=generator, dtype=torch.float64).to(weights.device)
    cdf = torch.cumsum(weights.double(), dim=0)
    total = cdf[-1]
    if float(total) <= 0.0:
        idx = (u * weights.numel()).long()
    else:
        idx = torch.searchsorted(cdf, u * total, right=True)
    return idx.clamp_(0, weights.numel() - 1)


def _kmeans_pp(x: torch.Tensor, x_sq: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding (as sklearn: 2 + floor(ln k) candidates per step).

    x: [N,C] float32, x_sq: [N] float32. Returns centers [K,C] float32 (copies of points).
    """
    n = x.shape[0]
    n_trials = 2 + int(math.log(k))
    first = torch.randint(n, (1,), generator=generator).to(x.device)
    centers = [x[first[0]]]
    closest = _sq_dists(x, x_sq, x[first])[:, 0]
    for _ in range(1, k):
        cand = _sample_by_weight(closest, n_trials, generator)
        d_cand = torch.minimum(closest[:, None], _sq_dists(x, x_sq, x[cand]))  # [N,T]
        best = torch.argmin(d_cand.sum(dim=0))
        centers.append(x[cand[best]])
        closest = d_cand[:, best]
    return torch.stack(centers)


def _reseed_empty(x: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor,
                  counts: torch.Tensor, min_dist: float) -> torch.Tensor:
    """Move each empty cluster's centre to a point far from its current centre.

    x: [N,C] float32, labels: [N] int64, centers: [K,C] float32 (means; old
    centres where empty), counts: [K] int64. Only points whose squared distance
    to their centre exceeds min_dist are used, farthest first; clusters left
    without such a point keep their centre. Returns centers [K,C] float32.
    """
    empty = torch.nonzero(counts == 0).flatten()
    if empty.numel() == 0:
        return centers
    diff = x - centers[labels]
    dist = (diff * diff).sum(dim=1)  # exact differences: duplicates give 0
    order = torch.argsort(dist, descending=True, stable=True)
    n_far = int((dist > min_dist).sum())
    n_use = min(n_far, empty.numel())
    if n_use > 0:
        centers[empty[:n_use]] = x[order[:n_use]]
    return centers


def _lloyd(x: torch.Tensor, x_sq: torch.Tensor, centers: torch.Tensor,
           max_iter: int, min_dist: float) -> tuple[torch.Tensor, float]:
    """Lloyd iterations until labels stop changing or max_iter.

    x: [N,C] float32, x_sq: [N] float32, centers: [K,C] float32 (initial),
    min_dist: squared-distance floor for re-seeding empty clusters.
    Returns (labels [N] int64, inertia as a Python float).
    """
    k = centers.shape[0]
    labels = torch.argmin(_sq_dists(x, x_sq, centers), dim=1)
    prev_centers = centers
    for _ in range(max_iter):
        onehot = F.one_hot(labels, k).to(x.dtype)  # [N,K]; matmul sums are deterministic on GPU
        counts = onehot.sum(dim=0).long()
        sums = onehot.T @ x
        means = sums / counts.clamp_min(1)[:, None].to(x.dtype)
        means = torch.where((counts > 0)[:, None], means, prev_centers)
        centers = _reseed_empty(x, labels, means, counts, min_dist)
        new_labels = torch.argmin(_sq_dists(x, x_sq, centers), dim=1)
        prev_centers = centers
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    dists = _sq_dists(x, x_sq, centers)
    inertia = float(dists.gather(1, labels[:, None]).sum())
    return labels, inertia


def _kmeans(x: torch.Tensor, k: int, seed: int, n_init: int, max_iter: int) -> torch.Tensor:
    """k-means of one image's points with n_init k-means++ restarts, lowest inertia kept.

    x: [N,C] float32 on any device. Returns labels [N] int64 on x's device.
    Ties in inertia keep the earliest restart.
    """
    min_dist = 1e-6 * float((x * x).sum(dim=1).mean())
    x = x - x.mean(dim=0, keepdim=True)  # centring reduces cancellation in the norm trick
    x_sq = (x * x).sum(dim=1)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int(seed))
    best_labels = None
    best_inertia = math.inf
    for _ in range(n_init):
        centers = _kmeans_pp(x, x_sq, k, generator)
        labels, inertia = _lloyd(x, x_sq, centers, max_iter, min_dist)
        if best_labels is None or inertia < best_inertia:
            best_labels, best_inertia = labels, inertia
    return best_labels


# ----------------------------------------------------------------------------
# agglomerative (sklearn, CPU)
# ----------------------------------------------------------------------------

def _agglomerative(x: torch.Tensor, k: int) -> torch.Tensor:
    """Ward-linkage agglomerative clustering (sklearn, CPU, float32).

    x: [N,C] float32 on any device. Returns labels [N] int64 on x's device.
    """
    from sklearn.cluster import AgglomerativeClustering

    pts = x.detach().to("cpu", torch.float32).numpy()
    model = AgglomerativeClustering(n_clusters=k, linkage="ward")
    labels = model.fit_predict(pts)
    return torch.from_numpy(labels.astype("int64")).to(x.device)


# ----------------------------------------------------------------------------
# labels
# ----------------------------------------------------------------------------

def _canonical_order(labels: torch.Tensor, k: int) -> torch.Tensor:
    """Renumber clusters by first appearance in the flat (raster) order.

    labels: [N] int64 in [0,k). Returns [N] int64: the cluster of labels[0] is 0,
    the next new cluster met is 1, ...; empty clusters get the highest numbers.
    """
    n = labels.numel()
    first = torch.full((k,), n, dtype=torch.int64, device=labels.device)
    pos = torch.arange(n, dtype=torch.int64, device=labels.device)
    first.scatter_reduce_(0, labels, pos, reduce="amin")
    order = torch.argsort(first, stable=True)
    mapping = torch.empty_like(order)
    mapping[order] = torch.arange(k, dtype=torch.int64, device=labels.device)
    return mapping[labels]


def cluster_features(features: torch.Tensor, n_clusters: int, method: str = "kmeans", seed: int = 0,
                     n_init: int = 10, max_iter: int = 300) -> torch.Tensor:
    """Cluster each image's feature map into n_clusters groups of pixels.

    Args:
        features: [B,C,h,w] floating tensor (any float dtype, fp16 included;
            computed in float32). Each image is clustered on its own, as h*w
            points of dimension C.
        n_clusters: number of clusters K, 1 <= K <= h*w.
        method: "kmeans" (torch, on the features' device, k-means++ with
            n_init restarts) or "agglomerative" (Ward linkage, sklearn on CPU).
        seed: seed of the CPU generator driving the k-means++ initialisation
            (unused by "agglomerative", which is deterministic).
        n_init: k-means restarts; the lowest-inertia one is kept.
        max_iter: maximum Lloyd iterations per restart.

    Returns:
        labels: [B,h,w] int64 in [0, n_clusters), on the features' device,
        in canonical order (label 0 is the cluster of pixel (0,0), then by
        first appearance in row-major order). Clusters may be empty when an
        image has fewer distinct feature vectors than n_clusters.

    Raises:
        ValueError: bad features shape/dtype, n_clusters < 1 or > h*w,
            unknown method, n_init or max_iter < 1.
    """
    _check_features(features, n_clusters)
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    _check_positive_int("n_init", n_init)
    _check_positive_int("max_iter", max_iter)
    b, c, h, w = features.shape
    points = features.detach().float().reshape(b, c, h * w).transpose(1, 2)  # [B,N,C]
    out = []
    for i in range(b):
        if method == "kmeans":
            lab = _kmeans(points[i], n_clusters, seed, n_init, max_iter)
        else:
            lab = _agglomerative(points[i], n_clusters)
        out.append(_canonical_order(lab, n_clusters))
    if not out:
        return torch.zeros((0, h, w), dtype=torch.int64, device=features.device)
    return torch.stack(out).reshape(b, h, w)


def _nearest_index(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """Source indices of nearest-exact resizing along one axis.

    Output i reads input floor((i + 0.5) * n_in / n_out), computed in exact
    integer arithmetic. Returns [n_out] int64 on device.
    """
    i = torch.arange(n_out, dtype=torch.int64, device=device)
    return ((2 * i + 1) * n_in // (2 * n_out)).clamp_(max=n_in - 1)


def labels_to_masks(labels: torch.Tensor, size: tuple[int, int],
                    n_clusters: int | None = None) -> torch.Tensor:
    """Upsample a label map with nearest-neighbour and split it into binary masks.

    Args:
        labels: [B,h,w] integer tensor (int64 expected) with values in [0,K).
        size: (H,W) target size; any positive ints (need not be multiples of h, w).
        n_clusters: K; defaults to labels.max()+1 (0 for an empty tensor).

    Returns:
        masks: [B,K,H,W] float32 in {0,1}, on labels' device. They partition
        the image (sum over K is 1 at every pixel); a cluster with no pixel
        gives an all-zero mask. Resizing is "nearest-exact" (pixel-centre
        aligned, as torch's interpolate(mode="nearest-exact") and PIL NEAREST).

    Raises:
        ValueError: bad labels shape/dtype, bad size, negative labels, or
            labels >= n_clusters.
    """
    if not isinstance(labels, torch.Tensor) or labels.dim() != 3:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be [B,h,w], got shape {shape}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in size)):
        raise ValueError(f"size must be (H, W) with positive ints, got {size!r}")
    labels = labels.long()
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"labels must be >= 0, got min {int(labels.min())}")
    max_label = int(labels.max()) if labels.numel() else -1
    k = max_label + 1 if n_clusters is None else n_clusters
    if isinstance(k, bool) or not isinstance(k, int) or k < 0 or k <= max_label:
        raise ValueError(f"n_clusters must be an int > labels.max() ({max_label}), got {n_clusters!r}")
    b, h, w = labels.shape
    big_h, big_w = size
    if h == 0 or w == 0:
        raise ValueError(f"labels must have h, w >= 1, got shape {tuple(labels.shape)}")
    rows = _nearest_index(h, big_h, labels.device)
    cols = _nearest_index(w, big_w, labels.device)
    up = labels[:, rows][:, :, cols]  # [B,H,W]
    ids = torch.arange(k, dtype=torch.int64, device=labels.device).view(1, k, 1, 1)
    return (up.unsqueeze(1) == ids).to(torch.float32)


__all__ = ["METHODS", "cluster_features", "labels_to_masks"]
