"""Mask refinement: a dense CRF and a guided filter written in plain torch.

FreeSeg-Diff clusters Stable Diffusion features at 1/8..1/32 of the image
resolution, so its masks have blocky edges. The paper snaps them to image
edges with a fully connected CRF (pydensecrf). This module re-implements that
CRF in torch (CPU or GPU, no C++ build) and adds a cheaper guided filter.

Public API
----------
``refine_masks(image, masks, method="crf", **params)``
    image ``[B,H,W,3]`` float 0..1 (ComfyUI IMAGE layout), masks ``[B,K,H,W]``
    float 0..1 -> ``[B,K,H,W]`` float32 on the masks' device.
``dense_crf(image_hw3, labels_hw, n_labels, **params)``
    mean-field inference of the dense CRF -> Q ``[n_labels,H,W]`` float32.
``guided_filter(guide, src, radius, eps)``
    He et al. guided filter with a colour guide.

CRF model (Kraehenbuehl & Koltun 2011, "Efficient inference in fully connected
CRFs with Gaussian edge potentials"), with the defaults of the official
FreeSeg-Diff code (``script-stable-segmentation/crf.py``, pydensecrf):

* unary from hard labels, ``gt_prob=0.9``: the pixel's label costs
  ``-log(0.9)``, every other label ``-log(0.1 / (n_labels - 1))``;
* Gaussian kernel over positions, ``gauss_sxy=20`` px, ``gauss_compat=5``;
* bilateral kernel over (x, y, r, g, b), ``bilateral_sxy=20`` px,
  ``bilateral_srgb=20`` (0..255 intensity units, as pydensecrf expects),
  ``bilateral_compat=100``;
* Potts compatibility, ``iterations=10``.

The update is pydensecrf's: ``Q = softmax(-U + sum_k w_k * Kn_k(Q))`` with
``Kn = D^-1/2 K D^-1/2`` (pydensecrf's default NORMALIZE_SYMMETRIC, where
``D = diag(K 1)``). A pixel's own contribution (kernel value 1 at distance 0)
is *included* in ``K``, for both kernels, as in pydensecrf's filters; since
the same ``K`` gives the normaliser ``D`` the treatment is consistent, and at
the defaults it is small (a flat 20 px neighbourhood holds ~2500 pixels of
kernel mass, so self is ~0.04 %; more only for pixels of a colour found
nowhere near them).

Labels for ``refine_masks(..., "crf")``: the K masks binarised at 0.5 (argmax
where they overlap) plus, only if some pixel is covered by no mask, a "void"
label. Void is an ordinary CRF label that is dropped from the output: a mask
that stops short of its object grows into void pixels of the object's colour,
one that overshoots hands foreign pixels back to void, and pixels that end as
void have every output mask 0. Masks with no pixel >= 0.5 stay all zero.

Filtering:

* the spatial Gaussian is an exact separable convolution (zero padding; the
  normaliser ``D`` accounts for the border). For ``sxy >= 8`` it runs on the
  image sum-pooled by ``f = floor(sxy / 4)`` (at most ``min(H, W) / 8``) and
  bilinearly upsampled; pooling and upsampling add variance ``f^2 / 4``, which
  is taken off the Gaussian's so the total spread stays ``sxy`` (within ~2 %
  away from the border);
* the bilateral (5-D) Gaussian uses a permutohedral lattice (Adams, Baek &
  Davis 2010), the same algorithm as pydensecrf's ``permutohedral.cpp``
  (same feature scaling, simplex rounding, ``[1/2, 1, 1/2]`` blur, neighbour
  rule), vectorised in torch with sort/unique/searchsorted instead of a hash
  table. Its size is bounded by ``H*W*6`` vertices whatever ``srgb``/``sxy``
  are, so no colour-bin clamp is needed (a bilateral grid would need one);
  small ``srgb``/``sxy`` only cost time (more distinct vertices, e.g. about
  5x slower at ``bilateral_srgb=1`` than at 20). Like pydensecrf's, the
  lattice only approximates the Gaussian (about 0.97 correlation with the
  exact 5-D kernel).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Protocol, Tuple

import torch
import torch.nn.functional as F

__all__ = ["refine_masks", "dense_crf", "guided_filter", "REFINE_METHODS",
           "CRF_DEFAULTS", "GUIDED_DEFAULTS"]

REFINE_METHODS: Tuple[str, ...] = ("none", "crf", "guided")

CRF_DEFAULTS: Dict[str, float] = {
    "gt_prob": 0.9,
    "gauss_sxy": 20.0,
    "gauss_compat": 5.0,
    "bilateral_sxy": 20.0,
    "bilateral_srgb": 20.0,
    "bilateral_compat": 100.0,
    "iterations": 10,
}

# radius=None means "scale with the image": max(1, round(min(H, W) / 32)),
# i.e. 16 px at 512 px, 4 px at 128 px: about half a cell of a 32x32 feature
# map upsampled to the image, the scale of the blocky edges to be fixed.
GUIDED_DEFAULTS: Dict[str, Optional[float]] = {"radius": None, "eps": 1e-3}

_PARTITION_TOL = 1e-3


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------
def refine_masks(image: torch.Tensor, masks: torch.Tensor, method: str = "crf",
                 **params) -> torch.Tensor:
    """Refine class-agnostic masks so that their edges follow the image.

    Args:
        image: ``[B,H,W,3]`` float, values 0..1 (ComfyUI IMAGE layout).
        masks: ``[B,K,H,W]`` float, values 0..1. ``K`` may be 0.
        method: ``"none"`` (float32 copy), ``"crf"`` (dense CRF, hard one-hot
            output) or ``"guided"`` (guided filter, soft output in 0..1).
        **params: method parameters. crf: ``gt_prob, gauss_sxy, gauss_compat,
            bilateral_sxy, bilateral_srgb, bilateral_compat, iterations``
            (see ``CRF_DEFAULTS``); guided: ``radius, eps`` (see
            ``GUIDED_DEFAULTS``); none: no parameters.

    Returns:
        ``[B,K,H,W]`` float32 on ``masks.device``. crf: one-hot per pixel (or
        all zero on pixels left "void", see the module docstring); where the
        inputs partition the image, so do the outputs. guided: soft, in
        [0,1], summing to 1 per pixel where the inputs do.

    Raises:
        ValueError: unknown method, or ``image``/``masks`` shapes that do not match.
        TypeError: unknown parameter names for the method.
    """
    if method not in REFINE_METHODS:
        raise ValueError(f"unknown refine method {method!r}; valid methods: {', '.join(REFINE_METHODS)}")
    _check_shapes(image, masks)
    if method == "none":
        _merge_params(method, params, {})
        return masks.detach().to(torch.float32).clone()
    if method == "crf":
        return _refine_crf(image, masks, _merge_params(method, params, CRF_DEFAULTS))
    return _refine_guided(image, masks, _merge_params(method, params, GUIDED_DEFAULTS))


def _check_shapes(image: torch.Tensor, masks: torch.Tensor) -> None:
    """Raise ValueError unless image is ``[B,H,W,3]`` and masks ``[B,K,H,W]`` with equal B, H, W."""
    if not isinstance(image, torch.Tensor) or not isinstance(masks, torch.Tensor):
        raise ValueError("image and masks must be torch tensors")
    if image.dim() != 4 or image.shape[-1] != 3:
        raise ValueError(f"image must be [B,H,W,3], got image shape {tuple(image.shape)}")
    if masks.dim() != 4:
        raise ValueError(f"masks must be [B,K,H,W], got masks shape {tuple(masks.shape)}")
    b, h, w, _ = image.shape
    if masks.shape[0] != b or masks.shape[2] != h or masks.shape[3] != w:
        raise ValueError(f"image {tuple(image.shape)} and masks {tuple(masks.shape)} disagree: "
                         f"expected masks [{b},K,{h},{w}]")
    if h < 1 or w < 1 or b < 1:
        raise ValueError(f"image must be non-empty, got image shape {tuple(image.shape)}")


def _merge_params(method: str, params: dict, defaults: dict) -> dict:
    """Return ``defaults`` updated with ``params``; TypeError naming unknown keys."""
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        valid = ", ".join(sorted(defaults)) or "(none)"
        raise TypeError(f"refine_masks(method={method!r}) got unknown parameter(s): "
                        f"{', '.join(unknown)}; valid: {valid}")
    merged = dict(defaults)
    merged.update(params)
    return merged


# ----------------------------------------------------------------------------------------------
# CRF
# ----------------------------------------------------------------------------------------------
def _refine_crf(image: torch.Tensor, masks: torch.Tensor, params: dict) -> torch.Tensor:
    """Run the dense CRF on each image of the batch; returns hard ``[B,K,H,W]`` float32 masks.

    Labels are the K masks binarised at 0.5 (argmax where they overlap) plus,
    only if some pixel is covered by no mask, one extra "void" label. Void
    takes part in the CRF like any other label (so its region may grow or
    shrink at edges, but it is never forced into a mask) and is dropped from
    the output, so void pixels come out with every mask 0. Masks with no pixel
    are left out of the CRF and stay all zero.
    """
    _check_crf_params(params)
    b, k, h, w = masks.shape
    out = torch.zeros((b, k, h, w), dtype=torch.float32, device=masks.device)
    for i in range(b):
        labels, present, has_void = _masks_to_labels(masks[i])
        if present.numel() == 0:
            continue
        n_labels = int(present.numel()) + int(has_void)
        img = image[i].to(device=masks.device, dtype=torch.float32)
        q = dense_crf(img, labels, n_labels, **params)
        winner = q.argmax(dim=0)
        for j, mask_index in enumerate(present.tolist()):
            out[i, mask_index] = (winner == j).to(torch.float32)
    return out


def _masks_to_labels(masks_khw: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, bool]:
    """Turn soft masks into a compact label map.

    Args:
        masks_khw: ``[K,H,W]`` float 0..1.

    Returns:
        labels ``[H,W]`` int64 in ``0..n-1`` where label ``j`` is mask
        ``present[j]`` and label ``len(present)`` (if ``has_void``) is void;
        present ``[n]`` int64 indices of masks that own at least one pixel;
        has_void: whether some pixel has every mask below 0.5.
    """
    k, h, w = masks_khw.shape
    device = masks_khw.device
    if k == 0:
        return (torch.zeros((h, w), dtype=torch.long, device=device),
                torch.zeros(0, dtype=torch.long, device=device), True)
    values, winner = masks_khw.to(torch.float32).max(dim=0)
    covered = values >= 0.5
    present = torch.unique(winner[covered])
    remap = torch.full((k,), -1, dtype=torch.long, device=device)
    remap[present] = torch.arange(present.numel(), device=device)
    labels = remap[winner]
    has_void = bool((~covered).any())
    labels = torch.where(covered, labels, torch.full_like(labels, present.numel()))
    return labels, present, has_void


def dense_crf(image_hw3: torch.Tensor, labels_hw: torch.Tensor, n_labels: int,
              **params) -> torch.Tensor:
    """Fully connected CRF with Potts Gaussian + bilateral kernels, mean-field inference.

    Args:
        image_hw3: ``[H,W,3]`` float, values 0..1 (RGB).
        labels_hw: ``[H,W]`` integer labels in ``0..n_labels-1``.
        n_labels: number of labels (>= 1).
        **params: overrides of ``CRF_DEFAULTS`` (``gt_prob, gauss_sxy,
            gauss_compat, bilateral_sxy, bilateral_srgb, bilateral_compat,
            iterations``).

    Returns:
        Q ``[n_labels,H,W]`` float32 marginals (sum to 1 per pixel) on the
        labels' device.
    """
    p = _merge_params("crf", params, CRF_DEFAULTS)
    _check_crf_params(p)
    h, w = labels_hw.shape
    if image_hw3.shape != (h, w, 3):
        raise ValueError(f"image_hw3 must be [H,W,3] matching labels {tuple(labels_hw.shape)}, "
                         f"got image shape {tuple(image_hw3.shape)}")
    _check_labels(labels_hw, n_labels)
    device = labels_hw.device
    if n_labels == 1:
        return torch.ones((1, h, w), dtype=torch.float32, device=device)
    unary = _unary_from_labels(labels_hw.long(), n_labels, float(p["gt_prob"]))
    image = image_hw3.to(device=device, dtype=torch.float32)
    filters = []
    if p["gauss_compat"] != 0:
        filters.append((float(p["gauss_compat"]), _SpatialGaussian(h, w, float(p["gauss_sxy"]), device)))
    if p["bilateral_compat"] != 0:
        feats = _bilateral_features(image, float(p["bilateral_sxy"]), float(p["bilateral_srgb"]))
        filters.append((float(p["bilateral_compat"]), _PermutohedralLattice(feats)))
    q = _mean_field(unary.reshape(n_labels, h * w), filters, int(p["iterations"]))
    return q.reshape(n_labels, h, w)


def _check_labels(labels_hw: torch.Tensor, n_labels: int) -> None:
    """Raise ValueError unless ``labels_hw`` is a ``[H,W]`` integer map with values in ``0..n_labels-1``."""
    if labels_hw.dim() != 2 or labels_hw.is_floating_point() or labels_hw.is_complex():
        raise ValueError(f"labels_hw must be an integer [H,W] tensor, got {labels_hw.dtype} "
                         f"shape {tuple(labels_hw.shape)}")
    if n_labels < 1:
        raise ValueError(f"n_labels must be >= 1, got {n_labels}")
    if labels_hw.numel() and (int(labels_hw.min()) < 0 or int(labels_hw.max()) >= n_labels):
        raise ValueError(f"labels_hw values must lie in 0..{n_labels - 1}")


def _check_crf_params(p: dict) -> None:
    """Raise ValueError for CRF parameter values outside their domain."""
    if not 0.0 < float(p["gt_prob"]) < 1.0:
        raise ValueError(f"gt_prob must be in (0, 1), got {p['gt_prob']}")
    for name in ("gauss_sxy", "bilateral_sxy", "bilateral_srgb"):
        if not float(p[name]) > 0.0:
            raise ValueError(f"{name} must be > 0, got {p[name]}")
    if int(p["iterations"]) < 0 or int(p["iterations"]) != p["iterations"]:
        raise ValueError(f"iterations must be a non-negative integer, got {p['iterations']}")


def _unary_from_labels(labels_hw: torch.Tensor, n_labels: int, gt_prob: float) -> torch.Tensor:
    """pydensecrf's ``unary_from_labels(zero_unsure=False)``.

    Args:
        labels_hw: ``[H,W]`` int64 labels in ``0..n_labels-1``.

    Returns:
        U ``[n_labels,H,W]`` float32 energies: ``-log(gt_prob)`` for the
        pixel's label, ``-log((1-gt_prob)/(n_labels-1))`` for the others
        (all 0 when ``n_labels == 1``).
    """
    h, w = labels_hw.shape
    if n_labels == 1:
        return torch.zeros((1, h, w), dtype=torch.float32, device=labels_hw.device)
    other = -math.log((1.0 - gt_prob) / (n_labels - 1))
    unary = torch.full((n_labels, h, w), other, dtype=torch.float32, device=labels_hw.device)
    unary.scatter_(0, labels_hw.unsqueeze(0), -math.log(gt_prob))
    return unary


class _GaussianFilter(Protocol):
    """Anything that blurs ``[C,N]`` float32 values with a fixed (unnormalised) Gaussian kernel."""

    def apply(self, values_cn: torch.Tensor) -> torch.Tensor:
        """``[C,N]`` float32 -> ``[C,N]`` float32."""
        ...


def _mean_field(unary_ln: torch.Tensor, filters: List[Tuple[float, _GaussianFilter]],
                iterations: int) -> torch.Tensor:
    """Mean-field updates ``Q = softmax(-U + sum_k w_k D_k^-1/2 K_k D_k^-1/2 Q)`` (Potts).

    Args:
        unary_ln: ``[L,N]`` float32 unary energies (L labels, N pixels).
        filters: ``(compat weight, filter)`` pairs; ``filter.apply`` maps
            ``[C,N]`` -> ``[C,N]`` (unnormalised Gaussian filtering).
        iterations: number of updates.

    Returns:
        Q ``[L,N]`` float32 marginals.
    """
    n = unary_ln.shape[1]
    ones = torch.ones((1, n), dtype=torch.float32, device=unary_ln.device)
    norms = [torch.rsqrt(f.apply(ones).clamp_min(1e-20)) for _, f in filters]
    q = torch.softmax(-unary_ln, dim=0)
    for _ in range(iterations):
        logits = -unary_ln
        for (weight, filt), norm in zip(filters, norms):
            logits = logits + weight * norm * filt.apply(q * norm)
        q = torch.softmax(logits, dim=0)
    return q


class _SpatialGaussian:
    """Unnormalised Gaussian blur over pixel positions (the CRF's appearance-free kernel).

    ``apply`` maps values ``[C,N]`` (N = H*W, row-major) to ``[C,N]``:
    ``out_i = sum_j exp(-|p_i - p_j|^2 / (2 sxy^2)) v_j`` (zero outside the
    image), truncated at 3 standard deviations. For ``sxy >= 8`` it runs on
    an average-pooled image (factor ``floor(sxy/4)``) and upsamples
    bilinearly, shrinking the Gaussian so the total spread stays ``sxy``.
    """

    def __init__(self, h: int, w: int, sxy: float, device: torch.device):
        self.h, self.w = h, w
        self.factor = max(1, min(int(sxy // 4), min(h, w) // 8)) if sxy >= 8 else 1
        f = self.factor
        sigma = math.sqrt(max(sxy * sxy - (f * f / 4.0 if f > 1 else 0.0), 1e-6)) / f
        self.kernel_h = _gaussian_kernel_1d(sigma, math.ceil(h / f), device)
        self.kernel_w = _gaussian_kernel_1d(sigma, math.ceil(w / f), device)

    def apply(self, values_cn: torch.Tensor) -> torch.Tensor:
        """Blur ``[C,N]`` float32 values; returns ``[C,N]`` float32."""
        c = values_cn.shape[0]
        x = values_cn.reshape(1, c, self.h, self.w)
        f = self.factor
        if f > 1:  # exact cell sums over a zero-padded image
            x = F.pad(x, (0, (-self.w) % f, 0, (-self.h) % f))
            x = F.avg_pool2d(x, f, stride=f) * (f * f)
        x = _separable_conv(x, self.kernel_h, self.kernel_w)
        if f > 1:
            x = F.interpolate(x, size=(x.shape[2] * f, x.shape[3] * f), mode="bilinear",
                              align_corners=False)
            x = x[:, :, : self.h, : self.w].contiguous()
        return x.reshape(c, self.h * self.w)


def _gaussian_kernel_1d(sigma: float, size: int, device: torch.device) -> torch.Tensor:
    """Unnormalised 1-D Gaussian taps ``exp(-x^2/(2 sigma^2))``, radius ``min(ceil(3 sigma), size-1)``.

    Returns ``[2r+1]`` float32.
    """
    radius = max(0, min(int(math.ceil(3.0 * sigma)), size - 1))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    return torch.exp(-0.5 * (x / sigma) ** 2)


def _separable_conv(x: torch.Tensor, kernel_h: torch.Tensor, kernel_w: torch.Tensor) -> torch.Tensor:
    """Depthwise separable convolution with zero padding; x ``[1,C,H,W]`` float32 -> same shape."""
    c = x.shape[1]
    rw = (kernel_w.numel() - 1) // 2
    rh = (kernel_h.numel() - 1) // 2
    x = F.conv2d(x, kernel_w.view(1, 1, 1, -1).expand(c, 1, 1, -1), padding=(0, rw), groups=c)
    return F.conv2d(x, kernel_h.view(1, 1, -1, 1).expand(c, 1, -1, 1), padding=(rh, 0), groups=c)


def _bilateral_features(image_hw3: torch.Tensor, sxy: float, srgb: float) -> torch.Tensor:
    """pydensecrf's bilateral features ``(x/sxy, y/sxy, R/srgb, G/srgb, B/srgb)``, RGB in 0..255.

    Args:
        image_hw3: ``[H,W,3]`` float32 0..1.

    Returns:
        ``[H*W,5]`` float32, row-major pixel order.
    """
    h, w, _ = image_hw3.shape
    dev = image_hw3.device
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=dev),
                            torch.arange(w, dtype=torch.float32, device=dev), indexing="ij")
    pos = torch.stack([xs, ys], dim=-1).reshape(h * w, 2) / sxy
    rgb = image_hw3.reshape(h * w, 3).clamp(0.0, 1.0) * (255.0 / srgb)
    return torch.cat([pos, rgb], dim=1)


class _PermutohedralLattice:
    """Gaussian filtering in a d-dimensional feature space (Adams, Baek & Davis 2010).

    Built once from features ``[N,d]`` (already divided by the standard
    deviations). ``apply`` maps ``[C,N]`` float32 values to
    ``out_i ~ sum_j exp(-|f_i - f_j|^2 / 2) v_j`` up to a constant factor
    (irrelevant after the CRF's normalisation): splat each pixel onto the
    d+1 vertices of its enclosing simplex with barycentric weights, blur with
    ``[1/2, 1, 1/2]`` along each of the d+1 lattice directions, slice back
    with the same weights. This is the algorithm of pydensecrf's
    ``permutohedral.cpp`` (same scaling, rounding, blur and neighbour rule),
    vectorised: vertices are found with ``torch.unique`` on integer-encoded
    keys instead of a hash table, so it runs unchanged on any device.
    Memory: ``O(N (d+1))`` for the pixel-to-vertex map, at most
    ``N (d+1)`` vertices, whatever the feature scales.
    """

    def __init__(self, features_nd: torch.Tensor):
        feats = features_nd.to(torch.float64)
        n, d = feats.shape
        self.n, self.d = n, d
        elevated = feats @ _elevation_matrix(d, feats.device)
        rem0, rank, bary = _simplex_vertices(elevated)
        del elevated
        columns = [_vertex_coordinate(rem0, rank, i) for i in range(d)]   # d x [N*(d+1)] int32
        del rem0, rank
        keys = _LatticeKeys(columns)
        uniq, inverse = torch.unique(keys.codes, sorted=True, return_inverse=True)
        self.m = int(uniq.numel())
        self.index = inverse                                             # [N*(d+1)] int64
        self.weights = bary.to(torch.float32)                            # [N,d+1]
        rep = torch.empty(self.m, dtype=torch.long, device=feats.device)
        rep.scatter_(0, inverse, torch.arange(inverse.numel(), device=feats.device))
        vertex_columns = [c[rep] for c in columns]
        del columns
        self.neighbours = _blur_neighbours(vertex_columns, uniq, keys)

    def apply(self, values_cn: torch.Tensor) -> torch.Tensor:
        """Filter ``[C,N]`` float32 values; returns ``[C,N]`` float32."""
        c = values_cn.shape[0]
        lattice = torch.zeros((self.m + 1, c), dtype=torch.float32, device=values_cn.device)
        contrib = self.weights.unsqueeze(-1) * values_cn.t().unsqueeze(1)   # [N,d+1,C]
        lattice.index_add_(0, self.index, contrib.reshape(-1, c))
        for n1, n2 in self.neighbours:
            lattice = lattice + 0.5 * (lattice[n1] + lattice[n2])
        sliced = lattice[self.index].reshape(self.n, self.d + 1, c)
        return (sliced * self.weights.unsqueeze(-1)).sum(dim=1).t()


def _elevation_matrix(d: int, device: torch.device) -> torch.Tensor:
    """``[d,d+1]`` float64 map from features to the hyperplane ``sum = 0`` of the lattice.

    Includes the per-axis scale ``sqrt(2/3) (d+1) / sqrt((i+1)(i+2))`` of
    Adams et al. / pydensecrf (the lattice blur then approximates a Gaussian
    of roughly unit standard deviation in feature space).
    """
    inv_std = math.sqrt(2.0 / 3.0) * (d + 1)
    scale = torch.tensor([inv_std / math.sqrt((i + 1) * (i + 2)) for i in range(d)],
                         dtype=torch.float64, device=device)
    cf = torch.diag(scale)
    e = torch.zeros((d, d + 1), dtype=torch.float64, device=device)
    e[:, d] = -d * cf[:, d - 1]
    for i in range(d - 1, 0, -1):
        e[:, i] = e[:, i + 1] - i * cf[:, i - 1] + (i + 2) * cf[:, i]
    e[:, 0] = e[:, 1] + 2 * cf[:, 0]
    return e


def _simplex_vertices(elevated: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Enclosing simplex of each elevated point.

    Args:
        elevated: ``[N,d+1]`` float64 points on the plane ``sum = 0``.

    Returns:
        rem0 ``[N,d+1]`` int64 (nearest remainder-0 lattice point),
        rank ``[N,d+1]`` int64 (simplex permutation) and barycentric
        weights ``[N,d+1]`` float64 of the d+1 vertices.
    """
    n, d1 = elevated.shape
    d = d1 - 1
    dev = elevated.device
    up = torch.ceil(elevated / d1) * d1
    down = torch.floor(elevated / d1) * d1
    rem0 = torch.where(up - elevated < elevated - down, up, down)
    total = torch.round(rem0.sum(dim=1) / d1).long()
    diff = elevated - rem0
    idx = torch.arange(d1, device=dev)
    after = idx.view(1, -1) > idx.view(-1, 1)                              # [i, j]: j after i
    di, dj = diff.unsqueeze(2), diff.unsqueeze(1)
    beats = torch.where(after, dj > di, dj >= di) & (idx.view(1, -1) != idx.view(-1, 1))
    rank = beats.sum(dim=2) + total.unsqueeze(1)
    low, high = rank < 0, rank > d
    rank = rank + d1 * low.long() - d1 * high.long()
    rem0 = rem0.round().long() + d1 * low.long() - d1 * high.long()
    delta = (elevated - rem0.double()) / d1
    bary = torch.zeros((n, d1 + 1), dtype=torch.float64, device=dev)
    bary.scatter_add_(1, d - rank, delta)
    bary.scatter_add_(1, d - rank + 1, -delta)
    bary[:, 0] += 1.0 + bary[:, d1]
    return rem0, rank, bary[:, :d1]


def _vertex_coordinate(rem0: torch.Tensor, rank: torch.Tensor, i: int) -> torch.Tensor:
    """Lattice coordinate ``i`` of the d+1 simplex vertices of every point, ``[N*(d+1)]`` int32.

    Vertex ``r`` of a point has coordinate ``rem0[i] + r - (d+1) * (rank[i] > d - r)``
    (pydensecrf's rule; only the first d coordinates are kept, the last is
    implied by ``sum = 0``). Flattened point-major: entry ``p*(d+1) + r``.
    """
    d1 = rem0.shape[1]
    d = d1 - 1
    r = torch.arange(d1, device=rem0.device).view(1, d1)
    coord = rem0[:, i:i + 1] + r - d1 * (rank[:, i:i + 1] > d - r).long()
    return coord.reshape(-1).to(torch.int32)


class _LatticeKeys:
    """Order-preserving int64 codes for integer lattice keys, safe from overflow.

    Codes are built coordinate by coordinate as ``code * span_i + (c_i - low_i)``;
    whenever the next step could exceed ``2^62`` the codes so far are first
    replaced by their rank among the vertices' distinct prefixes (the sorted
    prefix table is kept). Built from the vertex keys (``columns``: d arrays
    ``[M0]`` int32, duplicates allowed); ``self.codes`` ``[M0]`` int64 are their
    codes. ``encode`` codes other keys (blur neighbours) the same way and
    returns -1 for keys whose coordinates or prefixes no vertex has.
    """

    _LIMIT = 2 ** 62

    def __init__(self, columns: List[torch.Tensor]):
        self.low = [int(c.min()) for c in columns]
        self.span = [int(c.max()) - lo + 1 for c, lo in zip(columns, self.low)]
        self.tables: List[Optional[torch.Tensor]] = []
        code = torch.zeros_like(columns[0], dtype=torch.long)
        bound = 1
        for c, lo, span in zip(columns, self.low, self.span):
            table = None
            if bound * span >= self._LIMIT:
                table, code = torch.unique(code, sorted=True, return_inverse=True)
                bound = int(table.numel())
                if bound * span >= self._LIMIT:
                    raise ValueError("CRF lattice coordinates span too large a range; "
                                     "increase bilateral_sxy / bilateral_srgb")
            self.tables.append(table)
            code = code * span + (c.long() - lo)
            bound *= span
        self.codes = code

    def encode(self, columns: List[torch.Tensor]) -> torch.Tensor:
        """Codes ``[M]`` int64 of keys given as d coordinate arrays ``[M]``; -1 where no vertex can match."""
        code = torch.zeros_like(columns[0], dtype=torch.long)
        valid = torch.ones_like(code, dtype=torch.bool)
        for c, lo, span, table in zip(columns, self.low, self.span, self.tables):
            if table is not None:
                pos = torch.searchsorted(table, code).clamp_max(table.numel() - 1)
                valid &= table[pos] == code
                code = pos
            c = c.long() - lo
            valid &= (c >= 0) & (c < span)
            code = code * span + c
        return torch.where(valid, code, torch.full_like(code, -1))


def _blur_neighbours(vertex_columns: List[torch.Tensor], sorted_codes: torch.Tensor,
                     keys: _LatticeKeys) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Index pairs of the two neighbours of every vertex along each of the d+1 lattice directions.

    Along direction j the neighbours of key k are ``k - 1 + (d+1) e_j`` and
    ``k + 1 - (d+1) e_j`` (for j = d: ``k - 1`` and ``k + 1``), as in pydensecrf.

    Args:
        vertex_columns: d arrays ``[M]`` int32, the keys of the vertices in code order.
        sorted_codes: ``[M]`` int64 sorted vertex codes.
        keys: the encoder that produced ``sorted_codes``.

    Returns:
        d+1 pairs of ``[M+1]`` int64 indices; a missing neighbour (and the
        dummy row M itself) points at row M, which always holds zeros.
    """
    d = len(vertex_columns)
    m = int(sorted_codes.numel())
    dummy = torch.full((1,), m, dtype=torch.long, device=sorted_codes.device)
    pairs = []
    for j in range(d + 1):
        found = []
        for sign in (-1, 1):
            shifted = [c + sign * (-d if i == j else 1) for i, c in enumerate(vertex_columns)]
            code = keys.encode(shifted)
            pos = torch.searchsorted(sorted_codes, code).clamp_max(m - 1)
            hit = (code >= 0) & (sorted_codes[pos] == code)
            found.append(torch.cat([torch.where(hit, pos, torch.full_like(pos, m)), dummy]))
        pairs.append((found[0], found[1]))
    return pairs


# ----------------------------------------------------------------------------------------------
# Guided filter
# ----------------------------------------------------------------------------------------------
def _refine_guided(image: torch.Tensor, masks: torch.Tensor, params: dict) -> torch.Tensor:
    """Guided-filter every mask with its image as colour guide; returns soft ``[B,K,H,W]`` float32.

    Output is clamped to [0,1]. For an image whose input masks partition it
    (sum to 1 within 1e-3 at every pixel) the outputs are renormalised to sum
    to 1 per pixel.
    """
    b, k, h, w = masks.shape
    m = masks.detach().to(torch.float32)
    if k == 0:
        return m.clone()
    radius = params["radius"]
    radius = _default_radius(h, w) if radius is None else int(radius)
    eps = float(params["eps"])
    if radius < 0 or not eps > 0:
        raise ValueError(f"guided filter needs radius >= 0 and eps > 0, got radius={radius}, eps={eps}")
    guide = image.detach().to(device=m.device, dtype=torch.float32).permute(0, 3, 1, 2)
    out = guided_filter(guide, m, radius, eps).clamp(0.0, 1.0)
    partition = ((m.sum(dim=1) - 1.0).abs() <= _PARTITION_TOL).flatten(1).all(dim=1)
    renorm = out / out.sum(dim=1, keepdim=True).clamp_min(1e-8)
    return torch.where(partition.view(b, 1, 1, 1), renorm, out)


def _default_radius(h: int, w: int) -> int:
    """Guided-filter radius used when none is given: ``max(1, round(min(H, W) / 32))``."""
    return max(1, int(round(min(h, w) / 32.0)))


def guided_filter(guide: torch.Tensor, src: torch.Tensor, radius: int, eps: float) -> torch.Tensor:
    """Guided filter (He, Sun & Tang 2010/2013) with a multi-channel guide.

    Args:
        guide: ``[B,G,H,W]`` float32 guide (G = 3 for colour, 1 for grey).
        src: ``[B,K,H,W]`` float32 images to filter.
        radius: box radius in pixels (window ``2r+1``, clipped at borders).
        eps: regulariser (in squared guide units, guide in 0..1).

    Returns:
        ``[B,K,H,W]`` float32, unclamped.
    """
    b, g, h, w = guide.shape
    k = src.shape[1]
    mean_i = _box_mean(guide, radius)                                   # [B,G,H,W]
    mean_p = _box_mean(src, radius)                                     # [B,K,H,W]
    ii = (guide.unsqueeze(1) * guide.unsqueeze(2)).reshape(b, g * g, h, w)
    cov_ii = _box_mean(ii, radius).reshape(b, g, g, h, w) - mean_i.unsqueeze(1) * mean_i.unsqueeze(2)
    ip = (guide.unsqueeze(1) * src.unsqueeze(2)).reshape(b, k * g, h, w)
    cov_ip = _box_mean(ip, radius).reshape(b, k, g, h, w) - mean_p.unsqueeze(2) * mean_i.unsqueeze(1)
    sigma = cov_ii.permute(0, 3, 4, 1, 2) + eps * torch.eye(g, device=guide.device)
    rhs = cov_ip.permute(0, 3, 4, 2, 1)                                 # [B,H,W,G,K]
    a = torch.linalg.solve(sigma, rhs).permute(0, 4, 3, 1, 2)           # [B,K,G,H,W]
    bias = mean_p - (a * mean_i.unsqueeze(1)).sum(dim=2)                # [B,K,H,W]
    mean_a = _box_mean(a.reshape(b, k * g, h, w), radius).reshape(b, k, g, h, w)
    mean_b = _box_mean(bias, radius)
    return (mean_a * guide.unsqueeze(1)).sum(dim=2) + mean_b


def _box_mean(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over the ``(2r+1)^2`` window clipped to the image, via cumulative sums.

    x ``[B,C,H,W]`` float32 -> same shape; cost independent of ``radius``.
    """
    return _box_sum_1d(_box_sum_1d(x, radius, 3), radius, 2) / _box_count(x, radius)


def _box_sum_1d(x: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    """Sum over ``[i-r, i+r]`` clipped to ``[0, n-1]`` along ``dim``, via a cumulative sum."""
    n = x.shape[dim]
    c = torch.cumsum(x, dim=dim)
    zero = torch.zeros_like(c.narrow(dim, 0, 1))
    c = torch.cat([zero, c], dim=dim)                                   # c[i] = sum of x[:i]
    idx = torch.arange(n, device=x.device)
    hi = (idx + radius + 1).clamp_max(n)
    lo = (idx - radius).clamp_min(0)
    return c.index_select(dim, hi) - c.index_select(dim, lo)


def _box_count(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Number of pixels in each clipped window, ``[1,1,H,W]`` float32."""
    h, w = x.shape[-2:]
    ones = torch.ones((1, 1, h, w), dtype=x.dtype, device=x.device)
    return _box_sum_1d(_box_sum_1d(ones, radius, 3), radius, 2)
