"""Mask refinement: a dense CRF and a guided filter written in plain torch.

FreeSeg-Diff clusters Stable Diffusion features at 1/8..1/32 of the image
resolution, so its masks have blocky edges. The paper snaps them to image
edges with a fully connected CRF (pydensecrf). This module re-implements that
CRF in torch (CPU or GPU, no C++ build) and adds a cheaper guided filter.

Public API
----------
``refine_masks(image, masks, method="crf", named=None, **params)``
    image ``[B,H,W,3]`` float 0..1 (ComfyUI IMAGE layout), masks ``[B,K,H,W]``
    float 0..1, named ``[B,K]`` bools (which masks carry a name; None: all)
    -> ``[B,K,H,W]`` float32 on the masks' device.
``dense_crf(image_hw3, labels_hw, n_labels, **params)``
    mean-field inference of the (joint, n-label) dense CRF -> Q ``[n_labels,H,W]`` float32.
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

Two ways to use it on K masks:

* ``"crf"``, the paper's procedure (official ``segment.py``): every *named*
  mask, binarised at 0.5, gets its own 2-label CRF (mask vs rest); in mask
  (cluster) order, each result is pasted onto the pixels no earlier mask has
  taken. Unnamed masks come out all zero, and so do pixels no CRF claimed
  (holes): both are background. The CRFs of one image run batched: they share
  one lattice and one set of filters (the features are the image's), and a
  2-label mean field needs one channel per mask (``q_rest = 1 - q_mask``, so
  ``logit = U_rest - U_mask + sum_k w_k (2 Kn_k q_mask - Kn_k 1)``), so M
  masks cost about one M-label CRF instead of M separate ones.
* ``"crf_joint"``: one K-label CRF over all masks, named or not: the K masks
  binarised at 0.5 (argmax where they overlap) plus, only if some pixel is
  covered by no mask, a "void" label. Void is an ordinary CRF label that is
  dropped from the output: a mask that stops short of its object grows into
  void pixels of the object's colour, one that overshoots hands foreign
  pixels back to void, and pixels that end as void have every output mask 0.
  The output is a partition wherever the input is; ``named`` is not used.

Either way masks with no pixel >= 0.5 stay all zero. The CRF runs on the
masks' device when that is the CPU or CUDA, else on the CPU (the lattice uses
sparse CSR products).

Filtering:

* the spatial Gaussian is an exact separable convolution (zero padding; the
  normaliser ``D`` accounts for the border). For ``sxy >= 8`` it runs on the
  image sum-pooled by ``f = floor(sxy / 4)`` (at most ``min(H, W) / 8``) and
  bilinearly upsampled; pooling and upsampling add variance ``f^2 / 4``, which
  is taken off the Gaussian's so the total spread stays ``sxy`` (within ~2 %
  away from the border);
* the bilateral (5-D) Gaussian uses a permutohedral lattice (Adams, Baek &
  Davis 2010), the same algorithm as pydensecrf's ``permutohedral.cpp``
  (same float32 feature scaling and simplex rounding, so the same vertices
  and weights; same ``[1/2, 1, 1/2]`` blur and neighbour rule), vectorised
  in torch with sorted integer codes instead of a hash table and sparse
  matrices for splatting and slicing. Its size is bounded by ``H*W*6``
  vertices whatever ``srgb``/``sxy`` are, so no colour-bin clamp is needed
  (a bilateral grid would need one);
  small ``srgb``/``sxy`` only cost time (more distinct vertices, e.g. about
  5x slower at ``bilateral_srgb=1`` than at 20). Like pydensecrf's, the
  lattice only approximates the Gaussian (about 0.97 correlation with the
  exact 5-D kernel).
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional, Protocol, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

NamedFlags = Union[torch.Tensor, Sequence[Sequence[bool]]]

__all__ = ["refine_masks", "dense_crf", "guided_filter", "REFINE_METHODS",
           "CRF_DEFAULTS", "GUIDED_DEFAULTS"]

REFINE_METHODS: Tuple[str, ...] = ("none", "crf", "crf_joint", "guided")

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
                 named: Optional[NamedFlags] = None, **params) -> torch.Tensor:
    """Refine class-agnostic masks so that their edges follow the image.

    Args:
        image: ``[B,H,W,3]`` float, values 0..1 (ComfyUI IMAGE layout).
        masks: ``[B,K,H,W]`` float, values 0..1. ``K`` may be 0.
        method: ``"none"`` (float32 copy), ``"crf"`` (the paper's per-mask
            2-label CRFs pasted in mask order; hard output), ``"crf_joint"``
            (one K-label CRF; hard output) or ``"guided"`` (guided filter,
            soft output in 0..1).
        named: which masks carry a name, ``[B,K]`` bools (a bool tensor or B
            sequences of K bools); None means every mask. Only ``"crf"``
            uses it: unnamed masks come out all zero (background).
        **params: method parameters. crf, crf_joint: ``gt_prob, gauss_sxy,
            gauss_compat, bilateral_sxy, bilateral_srgb, bilateral_compat,
            iterations`` (see ``CRF_DEFAULTS``); guided: ``radius, eps`` (see
            ``GUIDED_DEFAULTS``); none: no parameters.

    Returns:
        ``[B,K,H,W]`` float32 on ``masks.device``. crf: 0/1, no pixel in two
        masks, unnamed masks and unclaimed pixels 0. crf_joint: one-hot per
        pixel (or all zero on pixels left "void", see the module docstring);
        where the inputs partition the image, so do the outputs. guided:
        soft, in [0,1], summing to 1 per pixel where the inputs do.

    Raises:
        ValueError: unknown method, ``image``/``masks`` shapes that do not
            match, or ``named`` not of shape ``[B,K]``.
        TypeError: unknown parameter names for the method.
    """
    if method not in REFINE_METHODS:
        raise ValueError(f"unknown refine method {method!r}; valid methods: {', '.join(REFINE_METHODS)}")
    _check_shapes(image, masks)
    flags = _named_flags(named, masks.shape[0], masks.shape[1])
    if method == "none":
        _merge_params(method, params, {})
        return masks.detach().to(torch.float32).clone()
    if method == "crf":
        return _refine_crf(image, masks, flags, _merge_params(method, params, CRF_DEFAULTS))
    if method == "crf_joint":
        return _refine_crf_joint(image, masks, _merge_params(method, params, CRF_DEFAULTS))
    return _refine_guided(image, masks, _merge_params(method, params, GUIDED_DEFAULTS))


def _named_flags(named: Optional[NamedFlags], b: int, k: int) -> torch.Tensor:
    """``named`` as a ``[B,K]`` bool CPU tensor (all True for None); ValueError on another shape."""
    if named is None:
        return torch.ones((b, k), dtype=torch.bool)
    flags = named.detach().cpu() if isinstance(named, torch.Tensor) else \
        torch.tensor([[bool(v) for v in row] for row in named], dtype=torch.bool).reshape(len(named), -1)
    if tuple(flags.shape) != (b, k) or (isinstance(named, torch.Tensor) and named.dtype != torch.bool):
        raise ValueError(f"named must be [B,K]=[{b},{k}] bools (one per mask), "
                         f"got {getattr(named, 'dtype', '')} shape {tuple(flags.shape)}")
    return flags


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
def _crf_device(device: torch.device) -> torch.device:
    """Where the CRF runs: ``device`` if it is the CPU or CUDA (sparse CSR products), else the CPU."""
    return device if device.type in ("cpu", "cuda") else torch.device("cpu")


def _refine_crf(image: torch.Tensor, masks: torch.Tensor, named: torch.Tensor, params: dict) -> torch.Tensor:
    """The paper's refinement of each image; returns 0/1 ``[B,K,H,W]`` float32 masks.

    Every named mask with a pixel >= 0.5 gets a 2-label CRF (mask vs rest),
    all of an image's at once (``_binary_crfs``); the results are pasted in
    mask order onto pixels not yet taken. Unnamed masks and pixels no CRF
    claimed stay 0.
    """
    _check_crf_params(params)
    b, k, h, w = masks.shape
    dev = _crf_device(masks.device)
    out = torch.zeros((b, k, h, w), dtype=torch.float32, device=dev)
    for i in range(b):
        fg = masks[i].to(dev) >= 0.5                                     # [K,H,W]
        chosen = [j for j in range(k) if bool(named[i, j]) and bool(fg[j].any())]
        if not chosen:
            continue
        img = image[i].to(device=dev, dtype=torch.float32)
        won = _binary_crfs(img, fg[chosen], params)                      # [M,H,W] bool
        taken = torch.zeros((h, w), dtype=torch.bool, device=dev)
        for j, mask_index in enumerate(chosen):
            region = won[j] & ~taken
            out[i, mask_index] = region.to(torch.float32)
            taken |= region
    return out.to(masks.device)


def _binary_crfs(image_hw3: torch.Tensor, fg_mhw: torch.Tensor, params: dict) -> torch.Tensor:
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


def _refine_crf_joint(image: torch.Tensor, masks: torch.Tensor, params: dict) -> torch.Tensor:
    """Run one joint dense CRF on each image of the batch; returns hard ``[B,K,H,W]`` float32 masks.

    Labels are the K masks binarised at 0.5 (argmax where they overlap) plus,
    only if some pixel is covered by no mask, one extra "void" label. Void
    takes part in the CRF like any other label (so its region may grow or
    shrink at edges, but it is never forced into a mask) and is dropped from
    the output, so void pixels come out with every mask 0. Masks with no pixel
    are left out of the CRF and stay all zero.
    """
    _check_crf_params(params)
    b, k, h, w = masks.shape
    dev = _crf_device(masks.device)
    out = torch.zeros((b, k, h, w), dtype=torch.float32, device=dev)
    for i in range(b):
        labels, present, has_void = _masks_to_labels(masks[i].to(dev))
        if present.numel() == 0:
            continue
        n_labels = int(present.numel()) + int(has_void)
        img = image[i].to(device=dev, dtype=torch.float32)
        q = dense_crf(img, labels, n_labels, **params)
        winner = q.argmax(dim=0)
        for j, mask_index in enumerate(present.tolist()):
            out[i, mask_index] = (winner == j).to(torch.float32)
    return out.to(masks.device)


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
        filters.append((float(p["bilateral_compat"]), _PermutohedralLattice(feats)))
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


class _PermutohedralLattice:
    """Gaussian filtering in a d-dimensional feature space (Adams, Baek & Davis 2010).

    Built once from features ``[N,d]`` (already divided by the standard
    deviations). ``apply`` maps ``[N,C]`` float32 values to
    ``out_i ~ sum_j exp(-|f_i - f_j|^2 / 2) v_j`` up to a constant factor
    (irrelevant after the CRF's normalisation): splat each pixel onto the
    d+1 vertices of its enclosing simplex with barycentric weights, blur with
    ``[1/2, 1, 1/2]`` along each of the d+1 lattice directions, slice back
    with the same weights. This is the algorithm of pydensecrf's
    ``permutohedral.cpp`` (same float32 elevation and simplex rounding, same
    vertices, weights, blur and neighbour rule; tests/unit/test_refine_lattice.py
    checks it against a plain re-implementation), vectorised: sorted integer
    codes instead of a hash table, and splat and slice as two sparse (CSR)
    matrices built once, ``[M,N]`` and ``[N,M]`` with d+1 entries per pixel,
    so every filter call is two sparse products and the blur's gathers. CSR
    products need the CPU or CUDA (``_crf_device``). Memory: ``O(N (d+1))``,
    at most ``N (d+1)`` vertices, whatever the feature scales.

    Keys: vertex ``r`` of a pixel's simplex has every coordinate ``= r (mod
    d+1)`` (its "class"), so a vertex is (class r, ``z``) with coordinate
    ``i = r + (d+1) z_i``, and every class holds exactly one vertex of every
    pixel. The build therefore sorts d+1 arrays of N codes of ``z`` alone
    (int32 at the defaults) rather than one array of ``N (d+1)`` full keys;
    vertices are numbered class by class (so a pixel's d+1 slice columns come
    in increasing order), and a vertex's blur neighbours lie in the previous
    class at a constant code offset (``_class_neighbour``), found for a whole
    class at once by one merge of two sorted arrays (``_lookup``).
    """

    def __init__(self, features_nd: torch.Tensor):
        feats = features_nd.to(torch.float32)
        n, d = feats.shape
        d1 = d + 1
        dev = feats.device
        self.n, self.d = n, d
        elevated = _elevate(feats)                                       # [d+1,N]
        rem0, rank, bary = _simplex_vertices(elevated)
        del elevated
        z0 = torch.div(rem0[:d], d1, rounding_mode="floor")               # [d,N]; rem0 is a multiple of d+1
        above = d - rank[:d]                                             # vertex r has z = z0 - [above < r]
        del rem0, rank
        radix = _class_radix(z0)
        keys = None
        if radix is not None:      # every vertex and blur neighbour fits one mixed-radix code
            codes = _class_codes(z0, above, radix)                       # [d+1,N]
        else:                      # huge coordinate ranges (tiny srgb/sxy): rank-compressed keys
            keys = _LatticeKeys([torch.cat([_class_z(z0, above, r)[i] for r in range(d1)]) for i in range(d)])
            codes = keys.codes.view(d1, n)
        # vertices class by class, in code order; every class has one vertex of every pixel
        col = torch.empty((d1, n), dtype=torch.int32, device=dev)       # splat: pixels by vertex
        splat_values = torch.empty((d1, n), dtype=torch.float32, device=dev)
        inverse = torch.empty((n, d1), dtype=torch.int32, device=dev)   # slice: vertex of each pixel
        uniq, rep_z, crow, offsets = [], [], [], [0]
        for r in range(d1):
            sorted_codes, order = torch.sort(codes[r], stable=True)
            first = torch.ones(n, dtype=torch.bool, device=dev)
            torch.ne(sorted_codes[1:], sorted_codes[:-1], out=first[1:])
            vertex = torch.cumsum(first, dim=0, dtype=torch.int32).sub_(1)   # of each sorted pixel
            size = int(vertex[-1]) + 1
            inverse[:, r].scatter_(0, order, vertex + offsets[r])
            uniq.append(torch.empty(size, dtype=codes.dtype, device=dev).scatter_(  # a vertex's pixels
                0, vertex.long(), sorted_codes))                                   # write one code
            if keys is not None:  # every pixel of a vertex writes the same z
                z = _class_z(z0, above, r)[:, order]
                rep_z.append(torch.empty((d, size), dtype=z.dtype, device=dev).scatter_(
                    1, vertex.long().expand(d, n), z).t())
            else:
                rep_z.append(None)
            counts = torch.bincount(vertex, minlength=size)
            crow.append(torch.cumsum(counts, dim=0).sub_(counts).add_(r * n))  # row starts
            col[r].copy_(order)
            torch.index_select(bary[r], 0, order, out=splat_values[r])
            offsets.append(offsets[r] + size)
        del codes
        self.m = m = offsets[d1]
        # first neighbours along every direction, one class at a time (one lookup per class)
        first = torch.empty((d1, m + 1), dtype=torch.int32, device=dev)
        first[:, m] = m
        miss = torch.tensor(m, dtype=torch.int32, device=dev)           # a tensor, for where(out=)
        for r in range(d1):
            t = (r - 1) % d1
            codes_r = torch.cat([_class_neighbour(uniq[r], r, j, radix, keys, rep_z[r]) for j in range(d1)])
            found = _lookup(uniq[t], codes_r).view(d1, -1)
            torch.where(found >= 0, found + offsets[t], miss, out=first[:, offsets[r]:offsets[r + 1]])
        own = torch.arange(m, dtype=torch.int32, device=dev)
        self.neighbours = []
        for first_j in first:
            second_j = torch.full((m + 1,), m, dtype=torch.int32, device=dev)
            second_j.scatter_(0, first_j[:m].long(), torch.where(first_j[:m] < m, own, m))  # misses: row M
            self.neighbours.append((first_j, second_j))
        crow.append(torch.full((2,), n * d1, dtype=torch.long, device=dev))       # row M (dummy) is empty
        self.splat = _csr(torch.cat(crow), col.view(-1), splat_values.view(-1), (m + 1, n))
        pixel_crow = torch.arange(0, n * d1 + 1, d1, dtype=torch.int32, device=dev)
        # a pixel's vertices come class by class, so its slice columns are in increasing order
        self.slice = _csr(pixel_crow, inverse.view(-1), bary.t().reshape(-1), (n, m + 1))
        self._scratch: Dict[int, Tuple[torch.Tensor, ...]] = {}

    def apply(self, values_nc: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Filter ``[N,C]`` float32 values into ``out`` (``[N,C]`` float32, allocated if None).

        Four channels at a time (``_filter_narrow``).
        """
        n, c = values_nc.shape
        if out is None:
            out = torch.empty((n, c), dtype=torch.float32, device=values_nc.device)
        for lo in range(0, c, 4):
            self._filter_narrow(values_nc[:, lo:lo + 4], out[:, lo:lo + 4])
        return out

    def _filter_narrow(self, values: torch.Tensor, out: torch.Tensor) -> None:
        """Filter ``[N,k]`` values (k <= 4) into ``out`` ``[N,k]``.

        The blur gathers whole lattice rows, and torch gathers a 1-D tensor far
        faster (about 3x) than the rows of a 2-D one, so each lattice row is
        viewed as one number: float32 for k = 1, complex64 for k = 2,
        complex128 for k = 4 (k = 3 is padded to 4). The lattice keeps its
        scratch buffers between calls (fresh multi-MiB tensors cost page faults).
        """
        k = values.shape[1]
        width = 4 if k == 3 else k
        src, lattice, both, gathered, result = self._buffers(width, values.device)
        if width != k or not values.is_contiguous():
            src[:, :k].copy_(values)
            values = src
        torch.addmm(lattice, self.splat, values, beta=0.0, out=lattice)  # [M+1,width]; row M is 0
        wide = _as_row_numbers(lattice)
        both_f = _as_float_rows(both, lattice.shape)
        gathered_f = _as_float_rows(gathered, lattice.shape)
        for n1, n2 in self.neighbours:
            torch.index_select(wide, 0, n1, out=both)
            torch.index_select(wide, 0, n2, out=gathered)
            both_f.add_(gathered_f)
            lattice.add_(both_f, alpha=0.5)                                 # row M stays 0
        if width == k and out.is_contiguous():
            torch.addmm(out, self.slice, lattice, beta=0.0, out=out)
        else:
            torch.addmm(result, self.slice, lattice, beta=0.0, out=result)
            out.copy_(result[:, :k])

    def _buffers(self, width: int, device: torch.device) -> Tuple[torch.Tensor, ...]:
        """Zeroed scratch for ``width`` channels: input ``[N,w]``, lattice ``[M+1,w]``, two gather
        targets ``[M+1]`` (``_as_row_numbers``) and output ``[N,w]``; made once per width."""
        if width not in self._scratch:
            lattice = torch.zeros((self.m + 1, width), dtype=torch.float32, device=device)
            self._scratch[width] = (
                torch.zeros((self.n, width), dtype=torch.float32, device=device), lattice,
                torch.zeros_like(_as_row_numbers(lattice)), torch.zeros_like(_as_row_numbers(lattice)),
                torch.zeros((self.n, width), dtype=torch.float32, device=device))
        return self._scratch[width]


_ROW_NUMBER = {1: torch.float32, 2: torch.complex64, 4: torch.complex128}


def _as_row_numbers(x: torch.Tensor) -> torch.Tensor:
    """Contiguous float32 ``[R,C]`` (C = 1, 2 or 4) viewed as ``[R]`` numbers of C float32 each."""
    return x.view(_ROW_NUMBER[x.shape[1]]).view(-1)


def _as_float_rows(x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The float32 ``[R,C]`` view (``shape``) of ``_as_row_numbers``'s result."""
    return x.view(torch.float32).view(shape)


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """A float32 sparse CSR matrix with int32 indices (less memory traffic than int64; sizes here
    stay far below 2^31 entries). torch marks CSR as beta; its warning is silenced here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
        return torch.sparse_csr_tensor(crow.to(torch.int32), col.to(torch.int32), values, size=size,
                                       dtype=torch.float32)


def _elevate(features_nd: torch.Tensor) -> torch.Tensor:
    """Features ``[N,d]`` float32 -> ``[d+1,N]`` float32 points on the lattice's plane ``sum = 0``.

    pydensecrf's elevation, step for step in float32 (``permutohedral.cpp``):
    ``cf_j = f_j * scale_j`` with ``scale_j = sqrt(2/3) (d+1) / sqrt((j+1)(j+2))``
    (the lattice blur then approximates a Gaussian of roughly unit standard
    deviation in feature space), ``e_j = s_j - j cf_{j-1}`` with ``s_j`` the
    sum of ``cf`` above ``j-1``, and ``e_0 = s_0``, the sum of all.
    """
    n, d = features_nd.shape
    inv_std = float(torch.tensor(math.sqrt(2.0 / 3.0) * (d + 1), dtype=torch.float32))
    elevated = torch.empty((d + 1, n), dtype=torch.float32, device=features_nd.device)
    total = torch.zeros(n, dtype=torch.float32, device=features_nd.device)
    for j in range(d, 0, -1):
        cf = features_nd[:, j - 1] * (1.0 / math.sqrt((j + 1) * j) * inv_std)
        torch.sub(total, cf * j, out=elevated[j])                        # no fused multiply-add
        total += cf
    elevated[0] = total
    return elevated


def _simplex_vertices(elevated: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Enclosing simplex of each elevated point (pydensecrf's float32 arithmetic).

    Args:
        elevated: ``[d+1,N]`` float32 points on the plane ``sum = 0`` (coordinate-major).

    Returns:
        rem0 ``[d+1,N]`` int32 (nearest remainder-0 lattice point),
        rank ``[d+1,N]`` int32 (simplex permutation) and barycentric
        weights ``[d+1,N]`` float32 of the d+1 vertices.
    """
    d1, n = elevated.shape
    d = d1 - 1
    # nearest multiple of d+1 as pydensecrf rounds: up if up - x < x - down, else down, with
    # up = down + d+1 (exact; where x/(d+1) is an integer up = down, and x - down ~ 0 picks down)
    down = torch.floor(elevated * (1.0 / d1)).mul_(d1)
    rem0 = down.add((down + d1).sub_(elevated) < (elevated - down), alpha=d1)
    del down
    total = torch.round(rem0.sum(dim=0) * (1.0 / d1)).to(torch.int32)      # exact: small integers
    # pydensecrf's rank: for each pair i < j the coordinate with the smaller remainder moves one
    # place down (i on ties), counted row by row: i gains lower_ij, j gains 1 - lower_ij
    diff = elevated - rem0
    rank = total.expand(d1, n).contiguous()
    rank += torch.arange(d1, dtype=torch.int32, device=elevated.device).view(d1, 1)  # the 1s of j
    lower = torch.empty(n, dtype=torch.int32, device=elevated.device)
    for i in range(d1):
        for j in range(i + 1, d1):
            torch.lt(diff[i], diff[j], out=lower)
            rank[i] += lower
            rank[j] -= lower
    wrap = (rank < 0).to(torch.int32).sub_((rank > d).to(torch.int32))
    rank.add_(wrap, alpha=d1)
    rem0 = rem0.to(torch.int32).add_(wrap, alpha=d1)
    # vertex r's weight is delta at slot d - rank minus delta at slot d - rank + 1 (slot d+1 wraps to 0)
    slot = torch.empty_like(elevated)
    slot.scatter_(0, (d - rank).long(), (elevated - rem0) * (1.0 / d1))
    bary = torch.empty_like(slot)
    torch.sub(slot[1:], slot[:-1], out=bary[1:])
    bary[0] = slot[0].double().sub_(slot[d].double()).add_(1.0)         # pydensecrf adds in double
    return rem0, rank, bary


def _lookup(table: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Position in ``table`` of each query, -1 where absent.

    Args:
        table: ``[T]`` sorted distinct codes (none negative).
        queries: ``[Q]`` codes of the same dtype (sorted makes it fastest).

    Returns:
        ``[Q]`` int32.

    One stable sort of the two concatenated (quick for two sorted runs, and
    faster than ``searchsorted`` then) counts the table entries ``<=`` each
    query (equal ones sort first); the last of them is the only candidate.
    """
    t = table.numel()
    source = torch.sort(torch.cat([table, queries]), stable=True)[1]
    below = torch.cumsum(source < t, dim=0, dtype=torch.int32)            # table entries so far
    count = torch.empty_like(below).scatter_(0, source, below)[t:]        # per query: entries <= it
    candidate = (count - 1).clamp_min_(0)
    hit = torch.index_select(table, 0, candidate) == queries
    return torch.where(hit, candidate, -1)


def _class_radix(z0: torch.Tensor) -> Optional[Tuple[List[int], List[int]]]:
    """Mixed-radix (lows, strides + [bound]) for the ``z`` of vertices and blur neighbours, or None.

    Args:
        z0: ``[d,N]`` int32, ``rem0 / (d+1)`` of every pixel.

    A vertex has ``z`` in ``[z0 - 1, z0]`` and a first blur neighbour in
    ``[z0 - 1, z0 + 1]`` (``_class_neighbour``), so coordinate i ranges over
    ``[min z0_i - 1, max z0_i + 1]``; codes ``sum_i stride_i (z_i - low_i)``
    over these ranges are distinct for distinct ``z`` and lie in
    ``[0, bound)``. None when ``bound`` reaches ``_LatticeKeys._LIMIT``.
    """
    lows, strides, bound = [], [], 1
    for i in range(z0.shape[0]):
        low = int(z0[i].min()) - 1
        span = int(z0[i].max()) + 1 - low + 1
        lows.append(low)
        strides.append(bound)
        bound *= span
        if bound >= _LatticeKeys._LIMIT:
            return None
    return lows, strides + [bound]


def _class_codes(z0: torch.Tensor, above: torch.Tensor, radix: Tuple[List[int], List[int]]) -> torch.Tensor:
    """Mixed-radix codes ``[d+1,N]`` of ``z`` of every pixel's vertex of each class r (row r).

    Args:
        z0, above: ``[d,N]`` int32 (``_class_z``).
        radix: ``_class_radix``'s result.

    Vertex r has ``z = z0 - [above < r]``, so its code is ``base - S_r`` with
    ``base`` the code of ``z0`` and ``S_r`` the summed strides of the
    coordinates with ``above < r``: an exclusive cumulative sum of the strides
    placed at slot ``above`` (distinct slots: ranks are a permutation).
    int32 when every code fits, else int64.
    """
    lows, strides = radix[0], radix[1][:-1]
    d, n = z0.shape
    dtype = torch.int32 if radix[1][-1] < 2 ** 31 else torch.long
    dev = z0.device
    stride = torch.tensor(strides, dtype=dtype, device=dev).view(d, 1)
    low = torch.tensor(lows, dtype=dtype, device=dev).view(d, 1)
    base = (z0.to(dtype) - low).mul_(stride).sum(dim=0, dtype=dtype)            # [N]
    by_slot = torch.zeros((d + 1, n), dtype=dtype, device=dev)
    by_slot.scatter_(0, above.long(), stride.expand(d, n))
    s_r = torch.cumsum(by_slot, dim=0, dtype=dtype).sub_(by_slot)              # exclusive: S_r
    return torch.sub(base, s_r, out=s_r)


def _class_z(z0: torch.Tensor, above: torch.Tensor, r: int) -> torch.Tensor:
    """``z`` ``[d,N]`` int32 of every pixel's class-r vertex: its coordinate ``i`` is ``r + (d+1) z_i``.

    pydensecrf's vertex r has coordinate ``rem0_i + r - (d+1) [rank_i > d - r]``;
    here ``z0 = rem0 / (d+1)`` and ``above = d - rank`` (first d coordinates).
    """
    return z0 - (above < r).to(z0.dtype)


def _class_neighbour(uniq: torch.Tensor, r: int, j: int, radix: Optional[Tuple[List[int], List[int]]],
                     keys: Optional["_LatticeKeys"], rep_z: Optional[torch.Tensor]) -> torch.Tensor:
    """Codes, in class ``r - 1 (mod d+1)``, of the first blur neighbours along j of class-r vertices.

    pydensecrf's first neighbour of key k along j is ``k - 1 + (d+1) e_j``
    (for j = d only the implied last coordinate moves: ``k - 1``). For a
    class-r vertex with r >= 1 that is the class r-1 key ``z + e_j``; for
    r = 0 the class d key ``z - 1 + e_j`` (``e_d`` is 0 on the d kept
    coordinates). With radix codes that is a constant offset of ``uniq``;
    with compressed keys ``keys`` encodes the shifted ``rep_z`` (-1 where no
    vertex can match).

    Args:
        uniq: ``[M_r]`` sorted codes of the class-r vertices.
        r, j: the vertices' class and the blur direction (0..d).
        radix: ``_class_radix``'s result, or None with compressed keys.
        keys: the compressed keys (None with radix codes).
        rep_z: ``[M_r,d]`` int32 ``z`` of the vertices (compressed keys only).

    Returns:
        ``[M_r]`` codes of the dtype of ``uniq``.
    """
    if radix is not None:
        strides = radix[1][:-1]
        offset = (strides[j] if j < len(strides) else 0) - (sum(strides) if r == 0 else 0)
        return uniq + offset
    shift = [int(i == j) - int(r == 0) for i in range(rep_z.shape[1])]
    return keys.encode([rep_z[:, i] + s for i, s in enumerate(shift)])


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
