"""Diffusion features: what the feature extractors hand to clustering.

The extraction itself depends on the model runtime (ComfyUI in `nodes/`, diffusers in
`freeseg.backends.diffusers`); the capture of a pass is `freeseg.capture`. This module holds
the runtime-free parts below it: which levels are used, block factors, and aggregation of
per-block maps into one feature grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

# Feature sources offered to users.
SOURCE_QUERIES = "cross_attn_queries"  # the paper: attn2 query vectors of the latent/4 blocks
SOURCE_DECODER = "decoder_blocks"  # outputs of the UNet decoder blocks at latent/4 and latent/2
SOURCES = (SOURCE_QUERIES, SOURCE_DECODER)


@dataclass
class DiffusionFeatures:
    """Per-image diffusion features and what is needed to map them back to the image.

    Attributes:
        features: `[B,C,h,w]` float16 feature grid (h = w = resolution / 16 by default).
        image_size: `(H, W)` of the original images, in pixels.
        family: model family name, e.g. ``"SD15"``, ``"SDXL"``.
        source: one of `SOURCES`.
        timestep: diffusion timestep the features were taken at (0..999).
        resolution: side of the square the images were resized to before encoding.
        blocks: names of the UNet blocks the channels came from, in order.
    """

    features: torch.Tensor
    image_size: tuple[int, int]
    family: str
    source: str
    timestep: int
    resolution: int
    blocks: list[str] = field(default_factory=list)


class StopPass(Exception):
    """Raised by the forward hook of the last layer a feature pass uses, so the rest of the UNet
    (at 512 px SD1.5: the 32x32 and 64x64 decoder levels, about half of a forward's time on
    a CPU) is never computed. ``freeseg.capture.LayerCapture`` catches it."""


def wanted_factors(factors: Iterable[int], source: str = SOURCE_QUERIES, fine: bool = False) -> set[int]:
    """The downscale factors (of the latent) whose layers FreeSeg-Diff uses, given the factors
    of all candidate layers.

    queries: latent/4 (the nearest level when the model has none there, the coarser one on a
    tie), plus half that factor with ``fine``; decoder: latent/4 and latent/2."""
    present = set(factors)
    if not present:
        raise ValueError("no UNet layer to choose from")
    if source == SOURCE_QUERIES:
        best = min(present, key=lambda f: (abs(math.log2(f) - 2), -f))
        return {best, best // 2} if fine else {best}
    return {2, 4}


def last_used_layer(layer_factors: Sequence[tuple[str, int]], source: str = SOURCE_QUERIES,
                    fine: bool = False) -> str | None:
    """Name of the last layer, in forward order, whose factor is wanted (``wanted_factors``);
    None when no layer is. ``layer_factors``: (name, downscale factor) of every candidate
    layer in forward order."""
    wanted = wanted_factors((f for _, f in layer_factors), source, fine)
    used = [name for name, f in layer_factors if f in wanted]
    return used[-1] if used else None


def block_factor(n_tokens: int, latent_hw: tuple[int, int], max_factor: int = 64) -> int:
    """The downscale factor f of a block whose token count is `n_tokens` for a latent of
    `latent_hw`, i.e. the f with ceil(h/f) * ceil(w/f) == n_tokens (UNet blocks round up).

    Raises ValueError when no power of two fits."""
    h, w = latent_hw
    f = 1
    while f <= max_factor:
        if -(-h // f) * -(-w // f) == n_tokens:
            return f
        f *= 2
    raise ValueError(f"{n_tokens} tokens match no power-of-two downscale of a {h}x{w} latent")


def output_factor(output: torch.Tensor, latent_hw: tuple[int, int]) -> int:
    """Downscale factor of a captured layer output: `[B,N,C]` tokens or a `[B,C,h,w]` map."""
    n = output.shape[1] if output.ndim == 3 else output.shape[-2] * output.shape[-1]
    return block_factor(n, latent_hw)


def tokens_to_map(tokens: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """`[B,N,C]` transformer tokens -> `[B,C,h,w]` map (row-major tokens, as UNets flatten)."""
    b, n, c = tokens.shape
    f = block_factor(n, latent_hw)
    h, w = -(-latent_hw[0] // f), -(-latent_hw[1] // f)
    return tokens.transpose(1, 2).reshape(b, c, h, w)


def aggregate_maps(maps: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize each `[B,C_i,h_i,w_i]` map to `size=(h,w)` and concatenate on channels.

    Returns `[B, sum C_i, h, w]` float32 (the paper: five 16x16 query maps -> 32x32, 6400 channels).
    """
    if not maps:
        raise ValueError("no feature maps to aggregate")
    out = [F.interpolate(m.float(), size=size, mode="bilinear", align_corners=False)
           if tuple(m.shape[-2:]) != tuple(size) else m.float() for m in maps]
    return torch.cat(out, dim=1)
