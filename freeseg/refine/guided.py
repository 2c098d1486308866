"""The guided filter (He, Sun & Tang 2010/2013) with a colour guide, in plain torch.

Every window mean is taken over the ``(2r+1)^2`` window clipped to the image
(cumulative sums; the cost does not depend on the radius), so border pixels
average only real pixels. ``kornia.filters.guided_blur`` computes the same
filter (full colour covariance) in the interior but pads the image at the
border (reflect, replicate, zeros or circular), which changes every pixel
within ``2r`` of it; tests/unit/test_refine.py pins the clipped border.
"""

from __future__ import annotations

import torch

__all__ = ["guided_filter"]


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
