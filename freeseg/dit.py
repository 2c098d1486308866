"""DiT backbones (Flux.1, Chroma, Flux.2, SD3.x): which blocks the features come from, at which
timestep and resolution, how a block's image tokens map onto the latent grid, and the massive
activations handled before clustering. Runtime-free: the ComfyUI node
(``nodes/diffusion_features.py``) finds the blocks in the model and runs the pass through
``freeseg.capture.LayerCapture``, as for UNets.

Per-family defaults (``FAMILIES``; the indices are for the released depth and scale with a
model's depth, ``block_indices``):

======  ===============================  ========  ==========  ===========================
family  blocks (image tokens of)         timestep  resolution  source
======  ===============================  ========  ==========  ===========================
Flux    double blocks 15, 16, 17, 18     500       1024        ConceptAttention (ICML 2025)
        of 19 (Flux.1 dev / schnell,
        Chroma)
Flux2   double blocks 6, 7 of 8          500       1024        Flux's choice scaled to the
        (Flux.2 dev)                                           depth (ours: no published
                                                               Flux.2 layer choice)
SD3     joint block 9 of 24 (SD3         714       1024        Seg4Diff (NeurIPS 2025)
        medium; SD3.5 scaled: 14 of 38)
======  ===============================  ========  ==========  ===========================

- Flux: ConceptAttention reads Flux's double-stream (multi-modal) blocks 15-18, averaged, on a
  real image noised to step 2 of Flux-schnell's 4-step schedule (t = 0.5, timestep 500 here)
  at 1024 px, and stops after the double blocks; so does this pass (the 38 single blocks
  never run).
- SD3: Seg4Diff finds MM-DiT block 9 the "semantic grounding" layer, at noise step 8 of a
  28-step schedule (timestep 1000 * (1 - 8/28) = 714 here), 1024 px.
- All take the block's output image tokens (the residual stream), not an attention map:
  the features FreeSeg-Diff clusters. Per DiTF (arXiv 2505.18584) these carry "massive
  activations" in a few fixed channels; ``normalise_tokens`` zeroes those channels and
  normalises each token (the parameter-free part of the block's AdaLN: its scale and shift
  are the same for every token of a pass), so every block weighs the same in the
  concatenation GoCA (CVPR 2026) asks for ("aggregated and rescaled").

The timestep and resolution are what the node's ``timestep`` / ``resolution`` inputs should be
set to for a family (the example workflows do); the node uses what it is given. Of the node's
options, ``detail`` applies (paper: a resolution/16 grid, the token grid itself; fine: a
resolution/8 grid, the tokens upsampled, as a DiT has no finer blocks) and ``source`` does
not (only the default ``cross_attn_queries``, read as "the family's blocks"; a DiT has no
decoder blocks, so ``decoder_blocks`` is refused).

Token order: Flux.1 and SD3 patchify the latent 2x2 into ``ceil(h/2) * ceil(w/2)`` tokens in
row-major order (``b c (h ph) (w pw) -> b (h w) (c ph pw)``; SD3 a stride-2 conv, flattened
the same way; Flux.2 takes each cell of its 128-channel 1/16 latent as one token, patch 1); the
double / joint blocks return the image stream apart from the text stream.
``image_tokens`` takes that stream (first the image tokens, then any reference-image tokens
Flux Kontext appends) and ``freeseg.features.tokens_to_map`` reshapes it row-major.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

__all__ = ["DiTFamily", "FAMILIES", "MODEL_FAMILIES", "MASSIVE_RATIO", "family_of", "block_indices",
           "token_grid", "image_tokens", "massive_channels", "normalise_tokens"]


@dataclass(frozen=True)
class DiTFamily:
    """Where and when a DiT family's features are taken.

    Attributes:
        name: family name shown to users.
        blocks: attribute of the diffusion model holding the blocks (a ModuleList).
        block_name: prefix of the captured layer names ("double_block" -> "double_block_15").
        image_output: index of the image-token stream in a block's output tuple.
        depth: number of blocks of the released model the indices are for.
        indices: the blocks used (0-based, at ``depth``).
        timestep: recommended timestep (0..999).
        resolution: recommended resolution (px).
        source: where the choice comes from.
        downscale: image pixels per latent cell (8; Flux.2's latent: 16).
    """

    name: str
    blocks: str
    block_name: str
    image_output: int
    depth: int
    indices: tuple[int, ...]
    timestep: int
    resolution: int
    source: str
    downscale: int = 8


FLUX = DiTFamily("Flux", "double_blocks", "double_block", 0, 19, (15, 16, 17, 18), 500, 1024,
                 "ConceptAttention (ICML 2025): Flux double-stream blocks 15-18 averaged, a real image noised to "
                 "step 2 of 4 (t = 0.5), 1024 px")
FLUX2 = DiTFamily("Flux2", "double_blocks", "double_block", 0, 19, (15, 16, 17, 18), 500, 1024,
                  "Flux.1's ConceptAttention blocks scaled to Flux.2's depth (6 and 7 of 8); no published Flux.2 "
                  "layer choice was used", downscale=16)
SD3 = DiTFamily("SD3", "joint_blocks", "joint_block", 1, 24, (9,), 714, 1024,
                "Seg4Diff (NeurIPS 2025): SD3 MM-DiT block 9, noise step 8 of 28, 1024 px")

FAMILIES: dict[str, DiTFamily] = {f.name: f for f in (FLUX, FLUX2, SD3)}
"""The supported DiT families by name."""

MODEL_FAMILIES: dict[str, DiTFamily] = {"Flux": FLUX, "FluxSchnell": FLUX, "Chroma": FLUX, "Flux2": FLUX2,
                                        "SD3": SD3}
"""ComfyUI model config class name (``comfy/supported_models.py``) -> family. Flux.1 dev /
schnell and Chroma share the Flux double-stream blocks (Flux.2's are the same code with a
shared modulation); SD3 covers SD3 medium and SD3.5."""

MASSIVE_RATIO = 50.0
"""A channel whose mean |activation| over an image's tokens exceeds this many times the median
channel's is a massive-activation channel (DiTF: a few fixed channels, hundreds of times the
rest); ours, not a published constant."""


def family_of(config_name: str) -> Optional[DiTFamily]:
    """The family of a ComfyUI model config class name; None when it is not a supported DiT."""
    return MODEL_FAMILIES.get(config_name)


def block_indices(family: DiTFamily, depth: int) -> list[int]:
    """The blocks used in a model of ``depth`` blocks: the family's indices scaled from its
    released depth (floor of ``i * depth / family.depth``), deduplicated, in forward order.
    At the released depth they are the indices themselves."""
    if depth < 1:
        raise ValueError(f"a {family.name} model with {depth} {family.blocks} has no block to read")
    return sorted({min(depth - 1, i * depth // family.depth) for i in family.indices})


def token_grid(latent_hw: tuple[int, int], patch: int) -> tuple[int, int]:
    """(rows, columns) of image tokens for a latent of ``latent_hw`` patchified ``patch`` x
    ``patch`` (padded up to a multiple: ceil)."""
    return math.ceil(latent_hw[0] / patch), math.ceil(latent_hw[1] / patch)


def image_tokens(output: Any, family: DiTFamily, latent_hw: tuple[int, int], patch: int) -> torch.Tensor:
    """The ``[B, N, C]`` image tokens of a block's ``output`` (the image stream of the output
    tuple; its first ``N = rows * columns`` tokens: reference-image tokens come after)."""
    stream = output[family.image_output] if isinstance(output, (tuple, list)) else output
    rows, cols = token_grid(latent_hw, patch)
    if stream.ndim != 3 or stream.shape[1] < rows * cols:
        raise ValueError(f"{family.name} {family.block_name}: expected [B, >={rows * cols}, C] image tokens for a "
                         f"{latent_hw[0]}x{latent_hw[1]} latent, got shape {tuple(stream.shape)}")
    return stream[:, :rows * cols]


def massive_channels(tokens: torch.Tensor, ratio: float = MASSIVE_RATIO) -> torch.Tensor:
    """``[B, C]`` bool: the massive-activation channels of each image's ``[B, N, C]`` tokens
    (mean |activation| over the tokens above ``ratio`` times the median channel's; none when
    the median channel is all zeros)."""
    magnitude = tokens.float().abs().mean(dim=1)
    median = magnitude.median(dim=1, keepdim=True).values
    return (magnitude > ratio * median) & (median > 0)


def normalise_tokens(tokens: torch.Tensor, ratio: float = MASSIVE_RATIO, eps: float = 1e-6) -> torch.Tensor:
    """``[B, N, C]`` tokens -> float32 tokens with each image's massive channels set to 0
    (dropped; zeroed so that every image keeps C channels) and every token normalised to zero
    mean and unit variance over the other channels (a LayerNorm without affine)."""
    x = tokens.float()
    keep = (~massive_channels(x, ratio)).to(x.dtype)[:, None, :]  # [B,1,C]
    count = keep.sum(dim=-1, keepdim=True).clamp(min=1.0)
    mean = (x * keep).sum(dim=-1, keepdim=True) / count
    var = (((x - mean) * keep) ** 2).sum(dim=-1, keepdim=True) / count
    return (x - mean) * torch.rsqrt(var + eps) * keep
