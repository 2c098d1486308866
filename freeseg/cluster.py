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
    auto_cluster_features(features, max_clusters, ...)
        [B,C,h,w] -> ([B,h,w] labels, B chosen K): over-segment, then merge (n_clusters=0 above)
    adaptive_n_clusters(n_classes, offset, limit) -> K = classes + offset (official code)
    cluster_features_shared(features, n_clusters, ...)
        [B,C,h,w] -> [B,h,w] labels with one set of centroids for the whole batch

k-means runs in torch on the features' device, its n_init restarts batched
together. With no more points than channels (the paper's 1024 x 6400) it
works on the Gram matrix of the centred points, computed once, which keeps
every distance exact while an iteration costs N*N instead of N*C per centre.
Its k-means++ initialisation
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
        raise ValueError(f"n_clusters must be an int >= 1 (or 0 = automatic), got {n_clusters!r}")
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

class _Points:
    """One image's centred points and their inner products.

    A centre is held as a weight vector over the points (c = sum_j w_j x_j: a
    mean has weights 1/count on its members, a k-means++ seed weight 1 on one
    point), so Lloyd only needs inner products x_i . c. When there are no more
    points than dimensions (the paper's 1024 points x 6400 channels) these
    come from the Gram matrix G = X X^T, computed once: every iteration then
    costs N*N*M instead of N*C*M, and distances are exactly those of the
    original space (the Gram matrix loses nothing). Otherwise the features
    are used directly.

    x: [N,C] float32, centred. sq: [N] float32 squared norms.
    """

    def __init__(self, x: torch.Tensor):
        self.x = x
        self.n = x.shape[0]
        self.gram = x @ x.T if x.shape[0] <= x.shape[1] else None  # [N,N] float32
        self.sq = self.gram.diagonal().clone() if self.gram is not None else (x * x).sum(dim=1)

    def dots(self, weights: torch.Tensor) -> torch.Tensor:
        """x_i . c_m for centres given as weights [N,M] float32; returns [N,M] float32."""
        if self.gram is not None:
            return self.gram @ weights
        return self.x @ (weights.T @ self.x).T

    def columns(self, idx: torch.Tensor) -> torch.Tensor:
        """x_i . x_j for the points idx [M] int64; returns [N,M] float32."""
        if self.gram is not None:
            return self.gram[:, idx]
        return self.x @ self.x[idx].T

    def sq_dists(self, weights: torch.Tensor) -> torch.Tensor:
        """Squared distances ||x_i - c_m||^2 [N,M] float32 (clamped at 0) to centres weights [N,M]."""
        d = self.dots(weights)
        c_sq = (weights * d).sum(dim=0)
        return (self.sq[:, None] - 2.0 * d + c_sq[None, :]).clamp_min_(0.0)


def _sample_by_weight(weights: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """Draw n indices per row with probability proportional to that row's weights.

    weights: [R,N] float (>= 0), on any device; a row of zeros samples
    uniformly. The uniform numbers come from the CPU generator (R*n of them,
    row-major) and are moved to weights' device. Returns [R,n] int64 there.
    """
    r, size = weights.shape
    u = torch.rand((r, n), generator=generator, dtype=torch.float64).to(weights.device)
    cdf = torch.cumsum(weights.double(), dim=1)
    total = cdf[:, -1:]
    idx = torch.searchsorted(cdf, u * total, right=True)
    idx = torch.where(total > 0.0, idx, (u * size).long())
    return idx.clamp_(0, size - 1)


def _kmeans_pp(points: _Points, k: int, n_init: int, generator: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding (as sklearn: 2 + floor(ln k) candidates per step), n_init at once.

    Returns seed indices [n_init,K] int64 (points chosen as initial centres).
    """
    n, dev = points.n, points.sq.device
    n_trials = 2 + int(math.log(k))
    rows = torch.arange(n_init, device=dev)
    first = torch.randint(n, (n_init,), generator=generator).to(dev)
    seeds = [first]
    closest = (points.sq[None, :] - 2.0 * points.columns(first).T
               + points.sq[first][:, None]).clamp_min_(0.0)  # [R,N]
    for _ in range(1, k):
        cand = _sample_by_weight(closest, n_trials, generator)  # [R,T]
        cross = points.columns(cand.reshape(-1)).T.reshape(n_init, n_trials, n)
        d_cand = (points.sq[None, None, :] - 2.0 * cross + points.sq[cand][:, :, None]).clamp_min_(0.0)
        d_cand = torch.minimum(closest[:, None, :], d_cand)  # [R,T,N]
        best = torch.argmin(d_cand.sum(dim=2), dim=1)  # [R]
        seeds.append(cand[rows, best])
        closest = d_cand[rows, best]
    return torch.stack(seeds, dim=1)


def _reseed_empty(points: _Points, labels: torch.Tensor, weights: torch.Tensor,
                  counts: torch.Tensor, min_dist: float) -> torch.Tensor:
    """Move each empty cluster's centre to a point far from its current centre.

    labels: [N] int64, weights: [N,K] float32 (means; old centres where
    empty), counts: [K] int64. Distances to the centres are recomputed from
    the points themselves (exact differences: duplicates give 0). Only points
    whose squared distance to their centre exceeds min_dist are used,
    farthest first; clusters left without such a point keep their centre.
    Returns weights [N,K] float32.
    """
    empty = torch.nonzero(counts == 0).flatten()
    if empty.numel() == 0:
        return weights
    centres = weights.T @ points.x  # [K,C]
    diff = points.x - centres[labels]
    dist = (diff * diff).sum(dim=1)
    order = torch.argsort(dist, descending=True, stable=True)
    n_use = min(int((dist > min_dist).sum()), empty.numel())
    if n_use > 0:
        weights = weights.clone()
        weights[:, empty[:n_use]] = 0.0
        weights[order[:n_use], empty[:n_use]] = 1.0
    return weights


def _lloyd(points: _Points, seeds: torch.Tensor, max_iter: int,
           min_dist: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd iterations of all restarts at once, each until its labels stop changing or max_iter.

    seeds: [R,K] int64 initial centre points, min_dist: squared-distance
    floor for re-seeding empty clusters. A restart that has converged is
    frozen, so each restart gives what it would give alone.
    Returns (labels [R,N] int64, inertia [R] float32).
    """
    r, k = seeds.shape
    n, dev = points.n, points.sq.device
    weights = torch.zeros((n, r * k), dtype=torch.float32, device=dev)
    weights[seeds.reshape(-1), torch.arange(r * k, device=dev)] = 1.0
    labels = points.sq_dists(weights).view(n, r, k).argmin(dim=2)  # [N,R]
    active = torch.ones(r, dtype=torch.bool, device=dev)
    for _ in range(max_iter):
        onehot = F.one_hot(labels, k).to(torch.float32)  # [N,R,K]; matmul sums are deterministic on GPU
        counts = onehot.sum(dim=0)  # [R,K]
        means = onehot / counts.clamp_min(1.0)
        new_w = torch.where(counts > 0, means, weights.view(n, r, k))
        for i in torch.nonzero((counts == 0).any(dim=1) & active).flatten().tolist():
            new_w[:, i] = _reseed_empty(points, labels[:, i], new_w[:, i], counts[i].long(), min_dist)
        weights = torch.where(active[None, :, None], new_w, weights.view(n, r, k)).reshape(n, r * k)
        new_labels = points.sq_dists(weights).view(n, r, k).argmin(dim=2)
        changed = (new_labels != labels).any(dim=0) & active
        labels = torch.where(changed[None, :], new_labels, labels)
        active = changed
        if not bool(active.any()):
            break
    dists = points.sq_dists(weights).view(n, r, k)
    inertia = dists.gather(2, labels[:, :, None]).sum(dim=(0, 2))
    return labels.T.contiguous(), inertia


def _kmeans(x: torch.Tensor, k: int, seed: int, n_init: int, max_iter: int) -> torch.Tensor:
    """k-means of one image's points with n_init k-means++ restarts, lowest inertia kept.

    x: [N,C] float32 on any device. Returns labels [N] int64 on x's device.
    The restarts run batched; ties in inertia keep the earliest restart.
    """
    min_dist = 1e-6 * float((x * x).sum(dim=1).mean())
    points = _Points(x - x.mean(dim=0, keepdim=True))  # centring reduces cancellation in the norm trick
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int(seed))
    seeds = _kmeans_pp(points, k, n_init, generator)
    labels, inertia = _lloyd(points, seeds, max_iter, min_dist)
    return labels[int(torch.argmin(inertia))]


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
                     n_init: int = 10, max_iter: int = 300, max_clusters: int = 8) -> torch.Tensor:
    """Cluster each image's feature map into n_clusters groups of pixels.

    ``n_clusters=0`` chooses K per image from the features alone, in 2..max_clusters
    (``auto_cluster_features``: over-segment, then merge redundant clusters); the labels of an
    image then lie in [0, K_image).

    Args:
        features: [B,C,h,w] floating tensor (any float dtype, fp16 included;
            computed in float32). Each image is clustered on its own, as h*w
            points of dimension C.
        n_clusters: number of clusters K, 1 <= K <= h*w; 0 = automatic (see above).
        method: "kmeans" (torch, on the features' device, k-means++ with
            n_init restarts) or "agglomerative" (Ward linkage, sklearn on CPU).
        seed: seed of the CPU generator driving the k-means++ initialisation
            (unused by "agglomerative", which is deterministic).
        n_init: k-means restarts; the lowest-inertia one is kept.
        max_iter: maximum Lloyd iterations per restart.
        max_clusters: largest K tried when n_clusters is 0 (unused otherwise).

    Returns:
        labels: [B,h,w] int64 in [0, n_clusters), on the features' device,
        in canonical order (label 0 is the cluster of pixel (0,0), then by
        first appearance in row-major order). Clusters may be empty when an
        image has fewer distinct feature vectors than n_clusters.

    Raises:
        ValueError: bad features shape/dtype, n_clusters < 1 or > h*w,
            unknown method, n_init or max_iter < 1.
    """
    if n_clusters == 0 and not isinstance(n_clusters, bool):
        return auto_cluster_features(features, max_clusters, method, seed, n_init, max_iter)[0]
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


# ----------------------------------------------------------------------------
# beyond the paper: automatic K, K from the class list, one labelling per batch
# ----------------------------------------------------------------------------

def _segment_distances(centres: torch.Tensor) -> torch.Tensor:
    """Distance of each centre to the nearest other centre or straight segment between two others.

    centres: [K,C] float32. Computed from the centres' inner products (K^3 scalars, whatever C).
    Returns [K] float32 (inf when K = 1).
    """
    k = centres.shape[0]
    g = (centres @ centres.T).double()  # [K,K]
    sq = g.diagonal()
    # for a centre m and a segment a-b: <c_m - c_a, c_b - c_a> and |c_b - c_a|^2
    along = g[:, None, :] - g[:, :, None] - g[None, :, :] + sq[None, :, None]  # [m,a,b]
    pair = (sq[:, None] + sq[None, :] - 2.0 * g).clamp_min(0.0)  # squared centre distances [K,K]
    length, to_a = pair, pair  # |c_b - c_a|^2 as [a,b]; |c_m - c_a|^2 as [m,a]
    t = torch.where(length[None] > 0, along / length[None].clamp_min(1e-30), torch.zeros_like(along)).clamp(0.0, 1.0)
    dist = (to_a[:, :, None] - 2.0 * t * along + t * t * length[None]).clamp_min(0.0)  # [m,a,b]
    idx = torch.arange(k, device=centres.device)
    own = (idx[:, None, None] == idx[None, :, None]) | (idx[:, None, None] == idx[None, None, :])
    dist = dist.masked_fill(own, math.inf)  # a segment may not end at the centre itself
    return dist.flatten(1).min(dim=1).values.sqrt().float()


def _merge_clusters(x: torch.Tensor, labels: torch.Tensor, k: int, max_clusters: int,
                    min_fraction: float, merge_ratio: float) -> torch.Tensor:
    """Dissolve redundant clusters of one image one at a time (see ``auto_cluster_features``).

    x: [N,C] float32 points, labels: [N] int64 in [0,k). Returns [N] int64 labels in [0,k),
    some of them unused.
    """
    n = x.shape[0]
    alive = torch.bincount(labels, minlength=k) > 0
    while int(alive.sum()) > 2:
        onehot = F.one_hot(labels, k).to(x.dtype)  # [N,K]
        counts = onehot.sum(dim=0)
        centres = (onehot.T @ x) / counts.clamp_min(1.0)[:, None]  # [K,C]
        spread = ((x - centres[labels]) ** 2).sum(dim=1).mean().sqrt().clamp_min(1e-12)
        keep = torch.nonzero(alive).flatten()
        ratio = _segment_distances(centres[keep]) / spread  # [A]
        small = counts[keep] < min_fraction * n
        # the least distinct cluster while one is redundant by distance, then the smallest
        # undersized one, then (over max_clusters) the least distinct one
        j = int(torch.argmin(ratio))
        if float(ratio[j]) >= merge_ratio:
            if bool(small.any()):
                j = int(torch.argmin(torch.where(small, counts[keep], math.inf)))
            elif keep.numel() <= max_clusters:
                break
        gone = int(keep[j])
        rest = keep[keep != gone]
        members = labels == gone
        nearest = torch.cdist(x[members], centres[rest]).argmin(dim=1)
        labels = labels.clone()
        labels[members] = rest[nearest]
        alive[gone] = False
    return labels


def auto_cluster_features(features: torch.Tensor, max_clusters: int = 8, method: str = "kmeans",
                          seed: int = 0, n_init: int = 10, max_iter: int = 300, min_fraction: float = 0.02,
                          merge_ratio: float = 1.0) -> tuple[torch.Tensor, list[int]]:
    """Cluster each image with the number of clusters chosen from its features alone:
    over-segment, then merge.

    1. Each image is clustered (``cluster_features``) into K0 = min(2 * max_clusters, h*w)
       clusters, more than it has regions, so that small regions get a cluster of their own.
    2. Redundant clusters are dissolved one at a time, their pixels going to the nearest
       remaining centroid. First, while there is one, the least distinct cluster whose
       centroid lies within ``merge_ratio`` * s of another centroid or of the straight segment
       between two others, s being the within-cluster spread (root mean squared distance of
       the pixels to their centroids). Near another centroid: one region cut in two. Near a
       segment: a band of boundary pixels, whose features (a UNet token seeing two regions)
       are a blend of the two regions' features, not a region. Then the smallest cluster
       holding fewer than ``min_fraction`` of the pixels (with the bands gone first, its
       pixels join a region, not a band).
    3. It stops when no cluster is redundant and at most ``max_clusters`` remain, or when two
       remain (more than max_clusters: the least distinct goes, redundant or not). So
       2 <= K <= max_clusters, except K = 1 for an image of one distinct feature vector.

    The two thresholds (1.0 and 2%) were chosen on synthetic scenes at feature noise 0.5 and
    1.0: ``objects_scene`` and ``heldout_scene`` seeds 0..39 (below
    ``synthetic.heldout.HELDOUT_SEED0``); ``bench/bench_beyond.py --part autok`` measures it on
    the held-out seeds from there. Near 1.0 the ratio is sensitive to the noise: 1.25 is as
    good at noise 0.5 but merges real objects at noise 1.0.

    Cost per image: one clustering with K0 clusters (its n_init restarts) plus at most K0 - 2
    merge steps, each O(N C) for the spread and O(K0^3) for the segment distances.

    Args:
        features: [B,C,h,w] float tensor (as ``cluster_features``).
        max_clusters: largest K returned (>= 2; K = 1 when h*w = 1); the over-segmentation
            has 2 * max_clusters clusters.
        method, seed, n_init, max_iter: as ``cluster_features`` (for the over-segmentation).
        min_fraction: a cluster with fewer pixels than this fraction of h*w is merged away.
        merge_ratio: centroid distance (to another centroid or segment) below which, in units
            of the within-cluster spread, a cluster is merged away.

    Returns:
        (labels [B,h,w] int64 in canonical order with values in [0, K_b), the B chosen K_b).

    Raises:
        ValueError: bad features, max_clusters < 2, min_fraction outside [0, 1), merge_ratio < 0,
            or the arguments ``cluster_features`` refuses.
    """
    _check_features(features, 1)
    if isinstance(max_clusters, bool) or not isinstance(max_clusters, int) or max_clusters < 2:
        raise ValueError(f"max_clusters must be an int >= 2, got {max_clusters!r}")
    if not isinstance(min_fraction, (int, float)) or isinstance(min_fraction, bool) or not 0 <= min_fraction < 1:
        raise ValueError(f"min_fraction must be a number in [0, 1), got {min_fraction!r}")
    if not isinstance(merge_ratio, (int, float)) or isinstance(merge_ratio, bool) or not merge_ratio >= 0:
        raise ValueError(f"merge_ratio must be a number >= 0, got {merge_ratio!r}")
    b, c, h, w = features.shape
    n = h * w
    if n == 1:
        return torch.zeros((b, h, w), dtype=torch.int64, device=features.device), [1] * b
    k0 = min(2 * max_clusters, n)
    over = cluster_features(features, k0, method, seed, n_init, max_iter)  # [B,h,w]
    out, chosen = [], []
    for i in range(b):
        x = features[i].detach().float().reshape(c, n).T
        labels = _merge_clusters(x, over[i].reshape(-1), k0, max_clusters, min_fraction, merge_ratio)
        used = torch.unique(labels)
        remap = torch.zeros(k0, dtype=torch.int64, device=labels.device)
        remap[used] = torch.arange(used.numel(), device=labels.device)
        out.append(_canonical_order(remap[labels], used.numel()).reshape(h, w))
        chosen.append(used.numel())
    return torch.stack(out), chosen


def adaptive_n_clusters(n_classes: int, offset: int = 1, limit: int = 64) -> int:
    """The official code's adaptive K: the number of candidate classes plus ``offset``
    (e.g. 1 for a background segment), clamped to 1..limit."""
    for name, value in (("n_classes", n_classes), ("offset", offset), ("limit", limit)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int, got {value!r}")
    if n_classes < 0 or limit < 1:
        raise ValueError(f"need n_classes >= 0 and limit >= 1, got {n_classes} and {limit}")
    return max(1, min(n_classes + offset, limit))


def cluster_features_shared(features: torch.Tensor, n_clusters: int, method: str = "kmeans", seed: int = 0,
                            n_init: int = 10, max_iter: int = 300, max_clusters: int = 8) -> torch.Tensor:
    """Cluster all images of a batch together: one set of centroids for the B*h*w pixels, so a
    cluster index means the same thing in every image (e.g. across the frames of a clip).

    Args and Raises: as ``cluster_features`` (``n_clusters=0`` chooses one K for the batch).
    Returns:
        labels [B,h,w] int64 on the features' device, canonical over the batch (label 0 is
        the cluster of pixel (0,0) of image 0, then first appearance image by image in
        row-major order). A cluster may be absent from some images.
    Cost: one clustering of B*h*w points (k-means is linear in the points; agglomerative
    is quadratic in memory, so keep it to short clips).
    """
    if not isinstance(features, torch.Tensor) or features.dim() != 4:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"features must be [B,C,h,w], got shape {shape}")
    b, c, h, w = features.shape
    if b == 0:
        return torch.zeros((0, h, w), dtype=torch.int64, device=features.device)
    stacked = features.permute(1, 0, 2, 3).reshape(1, c, b * h, w)  # images one below the other
    labels = cluster_features(stacked, n_clusters, method, seed, n_init, max_iter, max_clusters)
    return labels.reshape(b, h, w)


__all__ = ["METHODS", "cluster_features", "labels_to_masks", "auto_cluster_features",
           "adaptive_n_clusters", "cluster_features_shared"]
