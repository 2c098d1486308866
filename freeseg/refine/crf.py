"""The dense CRF: model, mean-field inference and its two Gaussian filters.

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

``dense_crf`` runs one n-label CRF. ``binary_crfs`` runs M independent
2-label CRFs (mask vs rest) on one image at once: they share one lattice and
one set of filters (the features are the image's), and a 2-label mean field
needs one channel per mask (``q_rest = 1 - q_mask``, so
``logit = U_rest - U_mask + sum_k w_k (2 Kn_k q_mask - Kn_k 1)``).

Filtering:

* the spatial Gaussian is an exact separable convolution (zero padding; the
  normaliser ``D`` accounts for the border). For ``sxy >= 8`` it runs on the
  image sum-pooled by ``f = floor(sxy / 4)`` (at most ``min(H, W) / 8``) and
  bilinearly upsampled; pooling and upsampling add variance ``f^2 / 4``, which
  is taken off the Gaussian's so the total spread stays ``sxy`` (within ~2 %
  away from the border);
* the bilateral (5-D) Gaussian uses a permutohedral lattice (``lattice.py``).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Protocol, Tuple

import torch
import torch.nn.functional as F

from .lattice import PermutohedralLattice

__all__ = ["CRF_DEFAULTS", "dense_crf", "binary_crfs", "check_crf_params", "merge_params"]

CRF_DEFAULTS: Dict[str, float] = {
    "gt_prob": 0.9,
    "gauss_sxy": 20.0,
    "gauss_compat": 5.0,
    "bilateral_sxy": 20.0,
    "bilateral_srgb": 20.0,
    "bilateral_compat": 100.0,
    "iterations": 10,
}


def merge_params(method: str, params: dict, defaults: dict) -> dict:
    """Return ``defaults`` updated with ``params``; TypeError naming unknown keys.

    The one check of method parameters, for ``refine_masks`` (every method) and ``dense_crf``.
    """
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        valid = ", ".join(sorted(defaults)) or "(none)"
        raise TypeError(f"refine_masks(method={method!r}) got unknown parameter(s): "
                        f"{', '.join(unknown)}; valid: {valid}")
    merged = dict(defaults)
    merged.update(params)
    return merged


def binary_crfs(image_hw3: torch.Tensor, fg_mhw: torch.Tensor, params: dict) -> torch.Tensor:
    """M independent 2-label CRFs (mask vs rest) on one image, batched.

    Args:
        image_hw3: ``[H,W,3]`` float32 0..1.
        fg_mhw: ``[M,H,W]`` bool, the masks (label "mask" where True, "rest" elsewhere).
        params: full CRF parameters (``CRF_DEFAULTS`` keys).

    Returns:
        ``[M,H,W]`` bool: where "mask" wins (``q_mask > q_rest``; a tie goes
        to "rest", as pydensecrf's argmax picks label 0).
    """
    m, h, w = fg_mhw.shape
    gt_prob = float(params["gt_prob"])
    # U_rest - U_mask: +log(p/(1-p)) on mask pixels, -log(p/(1-p)) elsewhere (unary_from_labels, 2 labels)
    fg = fg_mhw.reshape(m, h * w).t().to(torch.float32)                  # [N,M]
    unary_gap = math.log(gt_prob / (1.0 - gt_prob)) * (2.0 * fg - 1.0)
    filters = _crf_filters(image_hw3, params)
    logit = _binary_mean_field(unary_gap, filters, int(params["iterations"]))
    return (logit > 0).t().reshape(m, h, w)


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
    p = merge_params("crf", params, CRF_DEFAULTS)
    check_crf_params(p)
    h, w = labels_hw.shape
    if image_hw3.shape != (h, w, 3):
        raise ValueError(f"image_hw3 must be [H,W,3] matching labels {tuple(labels_hw.shape)}, "
                         f"got image shape {tuple(image_hw3.shape)}")
    _check_labels(labels_hw, n_labels)
    device = labels_hw.device
    if n_labels == 1:
        return torch.ones((1, h, w), dtype=torch.float32, device=device)
    unary = _unary_from_labels(labels_hw.long(), n_labels, float(p["gt_prob"]))
    filters = _crf_filters(image_hw3.to(device=device, dtype=torch.float32), p)
    q = _mean_field(unary.reshape(n_labels, h * w).t(), filters, int(p["iterations"]))
    return q.t().reshape(n_labels, h, w)


def _crf_filters(image_hw3: torch.Tensor, p: dict) -> List[Tuple[float, "_GaussianFilter"]]:
    """The CRF's ``(compat weight, filter)`` pairs for one ``[H,W,3]`` float32 image (zero weights left out)."""
    h, w, _ = image_hw3.shape
    filters: List[Tuple[float, _GaussianFilter]] = []
    if p["gauss_compat"] != 0:
        filters.append((float(p["gauss_compat"]),
                        _SpatialGaussian(h, w, float(p["gauss_sxy"]), image_hw3.device)))
    if p["bilateral_compat"] != 0:
        feats = _bilateral_features(image_hw3, float(p["bilateral_sxy"]), float(p["bilateral_srgb"]))
        filters.append((float(p["bilateral_compat"]), PermutohedralLattice(feats)))
    return filters


def _check_labels(labels_hw: torch.Tensor, n_labels: int) -> None:
    """Raise ValueError unless ``labels_hw`` is a ``[H,W]`` integer map with values in ``0..n_labels-1``."""
    if labels_hw.dim() != 2 or labels_hw.is_floating_point() or labels_hw.is_complex():
        raise ValueError(f"labels_hw must be an integer [H,W] tensor, got {labels_hw.dtype} "
                         f"shape {tuple(labels_hw.shape)}")
    if n_labels < 1:
        raise ValueError(f"n_labels must be >= 1, got {n_labels}")
    if labels_hw.numel() and (int(labels_hw.min()) < 0 or int(labels_hw.max()) >= n_labels):
        raise ValueError(f"labels_hw values must lie in 0..{n_labels - 1}")


def check_crf_params(p: dict) -> None:
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
    """Anything that blurs ``[N,C]`` float32 values with a fixed (unnormalised) Gaussian kernel."""

    def apply(self, values_nc: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[N,C]`` float32 -> ``[N,C]`` float32 (N pixels, C channels), written into ``out``
        when given (an ``[N,C]`` float32 tensor not overlapping ``values_nc``)."""
        ...


def _normalisers(filters: List[Tuple[float, _GaussianFilter]], n: int,
                 device: torch.device) -> List[torch.Tensor]:
    """``D_k^-1/2 = (K_k 1)^-1/2`` of every filter, ``[N,1]`` float32 each."""
    ones = torch.ones((n, 1), dtype=torch.float32, device=device)
    return [f.apply(ones).clamp_min_(1e-20).rsqrt_() for _, f in filters]


def _mean_field(unary_nl: torch.Tensor, filters: List[Tuple[float, _GaussianFilter]],
                iterations: int) -> torch.Tensor:
    """Mean-field updates ``Q = softmax(-U + sum_k w_k D_k^-1/2 K_k D_k^-1/2 Q)`` (Potts).

    Args:
        unary_nl: ``[N,L]`` float32 unary energies (N pixels, L labels).
        filters: ``(compat weight, filter)`` pairs; ``filter.apply`` maps
            ``[N,C]`` -> ``[N,C]`` (unnormalised Gaussian filtering).
        iterations: number of updates.

    Returns:
        Q ``[N,L]`` float32 marginals.
    """
    neg_unary = -unary_nl.contiguous()
    norms = _normalisers(filters, neg_unary.shape[0], neg_unary.device)
    q = torch.softmax(neg_unary, dim=1)
    scaled, filtered, logits = torch.empty_like(q), torch.empty_like(q), torch.empty_like(q)
    for _ in range(iterations):
        if not filters:
            logits.copy_(neg_unary)
        for k, ((weight, filt), norm) in enumerate(zip(filters, norms)):
            filt.apply(torch.mul(q, norm, out=scaled), out=filtered)
            torch.addcmul(neg_unary if k == 0 else logits, norm, filtered, value=weight, out=logits)
        torch.softmax(logits, dim=1, out=q)
    return q


def _binary_mean_field(unary_gap: torch.Tensor, filters: List[Tuple[float, _GaussianFilter]],
                       iterations: int) -> torch.Tensor:
    """Mean field of M independent 2-label Potts CRFs sharing their kernels, one channel each.

    With ``q_rest = 1 - q_mask`` the 2-label update ``softmax(-U + sum_k w_k Kn_k Q)``
    is ``q_mask = sigmoid(U_rest - U_mask + sum_k w_k (2 Kn_k q_mask - Kn_k 1))``
    (``Kn = D^-1/2 K D^-1/2`` as in ``_mean_field``), exactly.

    Args:
        unary_gap: ``[N,M]`` float32, ``U_rest - U_mask`` per pixel and mask.
        filters: ``(compat weight, filter)`` pairs.
        iterations: number of updates.

    Returns:
        ``[N,M]`` float32 logits ``log(q_mask / q_rest)`` after the last update.
    """
    n, m = unary_gap.shape
    if iterations == 0:
        return unary_gap
    norms = _normalisers(filters, n, unary_gap.device)
    # the first update filters q and the constant Kn 1 term together (one call per filter)
    q = torch.ones((n, m + 1), dtype=torch.float32, device=unary_gap.device)
    torch.sigmoid(unary_gap, out=q[:, :m])
    scaled, filtered = torch.empty_like(q), torch.empty_like(q)
    base, logit = unary_gap.contiguous().clone(), unary_gap.contiguous().clone()
    for (weight, filt), norm in zip(filters, norms):
        filt.apply(torch.mul(q, norm, out=scaled), out=filtered)       # [N,M+1]
        base.addcmul_(norm, filtered[:, m:], value=-weight)
        logit.addcmul_(norm, filtered[:, :m], value=2.0 * weight)
        logit.addcmul_(norm, filtered[:, m:], value=-weight)
    q, scaled, filtered = q[:, :m].contiguous(), scaled[:, :m].contiguous(), filtered[:, :m].contiguous()
    for _ in range(iterations - 1):
        torch.sigmoid(logit, out=q)
        for k, ((weight, filt), norm) in enumerate(zip(filters, norms)):
            filt.apply(torch.mul(q, norm, out=scaled), out=filtered)
            torch.addcmul(base if k == 0 else logit, norm, filtered, value=2.0 * weight, out=logit)
    return logit


class _SpatialGaussian:
    """Unnormalised Gaussian blur over pixel positions (the CRF's appearance-free kernel).

    ``apply`` maps values ``[N,C]`` (N = H*W, row-major) to ``[N,C]``:
    ``out_i = sum_j exp(-|p_i - p_j|^2 / (2 sxy^2)) v_j`` (zero outside the
    image), truncated at 3 standard deviations. For ``sxy >= 8`` it runs on
    an average-pooled image (factor ``floor(sxy/4)``) and upsamples
    bilinearly, shrinking the Gaussian so the total spread stays ``sxy``.
    The ``[N,C]`` values are viewed as a channels-last image (no copy).
    """

    def __init__(self, h: int, w: int, sxy: float, device: torch.device):
        self.h, self.w = h, w
        self.factor = max(1, min(int(sxy // 4), min(h, w) // 8)) if sxy >= 8 else 1
        f = self.factor
        sigma = math.sqrt(max(sxy * sxy - (f * f / 4.0 if f > 1 else 0.0), 1e-6)) / f
        self.kernel_h = _gaussian_kernel_1d(sigma, math.ceil(h / f), device)
        self.kernel_w = _gaussian_kernel_1d(sigma, math.ceil(w / f), device)

    def apply(self, values_nc: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Blur ``[N,C]`` float32 values into ``out`` (``[N,C]`` float32, allocated if None)."""
        c = values_nc.shape[1]
        x = values_nc.reshape(1, self.h, self.w, c).permute(0, 3, 1, 2)   # channels-last [1,C,H,W]
        f = self.factor
        if f > 1:  # exact cell sums, partial cells at the bottom/right edges summed as if zero-padded
            x = F.avg_pool2d(x, f, stride=f, ceil_mode=True, divisor_override=1)
        x = _separable_conv(x, self.kernel_h, self.kernel_w)
        if f > 1:
            x = F.interpolate(x, size=(x.shape[2] * f, x.shape[3] * f), mode="bilinear",
                              align_corners=False)
            x = x[:, :, : self.h, : self.w]
        if out is None:
            out = torch.empty((self.h * self.w, c), dtype=torch.float32, device=values_nc.device)
        out.view(1, self.h, self.w, c).copy_(x.permute(0, 2, 3, 1))
        return out


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
    rgb = (image_hw3.reshape(h * w, 3).clamp(0.0, 1.0) * 255.0) / srgb
    return torch.cat([pos, rgb], dim=1)
