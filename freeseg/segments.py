"""Segments: masks of a batch of images with their names, and the outputs users chain on."""

from __future__ import annotations

import colorsys
from collections import namedtuple
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


@dataclass
class Segments:
    """Masks of a batch of B images, K masks per image, all at the images' own size (H, W).

    Attributes:
        masks: `[B,K,H,W]` float32 in 0..1 (CPU). Masks of one image may partition it.
        labels: B lists of K names; ``None`` for an unnamed (background) mask.
        scores: B lists of K floats (CLIP probability of the name; 0.0 when unnamed).
        class_names: B lists of the candidate class names each image was labelled against.
        instances: B lists of K instance indices (0 = largest connected part of a name) after
            ``freeseg.instances.split_instances``; ``None`` for a mask kept whole; empty
            (the default) when masks were never split.
        shared: True when mask k means the same segment in every image of the batch (one
            clustering for the batch, ``cluster_features_shared``); names are then given once
            for the batch.
    """

    masks: torch.Tensor
    labels: list[list[Optional[str]]]
    scores: list[list[float]]
    class_names: list[list[str]] = field(default_factory=list)
    instances: list[list[Optional[int]]] = field(default_factory=list)
    shared: bool = False

    @property
    def batch_size(self) -> int:
        return int(self.masks.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.masks.shape[-2]), int(self.masks.shape[-1])

    @classmethod
    def unlabelled(cls, masks: torch.Tensor, shared: bool = False) -> "Segments":
        """Class-agnostic segments: `masks` `[B,K,H,W]`, no names yet."""
        b, k = masks.shape[:2]
        return cls(masks.float().cpu(), [[None] * k for _ in range(b)], [[0.0] * k for _ in range(b)],
                   [[] for _ in range(b)], shared=shared)

    def with_masks(self, masks: torch.Tensor) -> "Segments":
        """The same names and scores over new `[B,K,H,W]` masks."""
        if tuple(masks.shape[:2]) != tuple(self.masks.shape[:2]):
            raise ValueError(f"masks must keep [B,K]={tuple(self.masks.shape[:2])}, got {tuple(masks.shape)}")
        return Segments(masks.float().cpu(), [list(l) for l in self.labels], [list(s) for s in self.scores],
                        [list(c) for c in self.class_names], [list(i) for i in self.instances], self.shared)

    def named(self) -> list[tuple[int, int]]:
        """`(image_index, mask_index)` of every named, non-empty mask (some pixel above 0.5), in
        batch then mask order: an empty mask gives no record, mask or SEGS entry."""
        filled = (self.masks > 0.5).flatten(2).any(dim=2)
        return [(b, k) for b in range(self.batch_size) for k, name in enumerate(self.labels[b])
                if name is not None and bool(filled[b, k])]

    def named_masks(self) -> torch.Tensor:
        """`[N,H,W]` float32, one mask per named segment (N may be 0)."""
        pairs = self.named()
        if not pairs:
            return torch.zeros((0, *self.image_size), dtype=torch.float32)
        return torch.stack([self.masks[b, k] for b, k in pairs])

    def union(self) -> torch.Tensor:
        """`[B,H,W]` float32: the union of each image's named masks (zeros if none)."""
        keep = torch.tensor([[name is not None for name in row] for row in self.labels],
                            dtype=torch.bool).reshape(self.masks.shape[:2])
        return (self.masks * keep[..., None, None]).amax(dim=1) if self.masks.shape[1] else \
            torch.zeros((self.batch_size, *self.image_size))

    def select(self, wanted: list[str]) -> torch.Tensor:
        """`[B,H,W]` float32 union of the masks whose name is in `wanted` (names compared
        case-insensitively) or whose index (as a string, e.g. "0") is in `wanted`."""
        wanted_l = {w.strip().lower() for w in wanted if w.strip()}
        out = torch.zeros((self.batch_size, *self.image_size), dtype=torch.float32)
        for b in range(self.batch_size):
            for k, name in enumerate(self.labels[b]):
                if str(k) in wanted_l or (name is not None and name.lower() in wanted_l):
                    out[b] = torch.maximum(out[b], self.masks[b, k])
        return out

    def records(self) -> list[dict]:
        """One dict per named, non-empty mask: image index, mask index, label, score, area
        (pixels above 0.5, at least 1) and bbox `[x0, y0, x1, y1]` (exclusive ends); plus
        "instance" (index among the parts of that label) when the masks were split."""
        out = []
        for b, k in self.named():
            m = self.masks[b, k] > 0.5
            out.append({"image": b, "mask": k, "label": self.labels[b][k],
                        "score": round(float(self.scores[b][k]), 6), "area": int(m.sum()),
                        "bbox": mask_bbox(m), **({"instance": self.instances[b][k]} if self.instances else {})})
        return out


def mask_bbox(mask: torch.Tensor) -> Optional[list[int]]:
    """`[H,W]` bool -> `[x0, y0, x1, y1]` with exclusive ends, or None when empty."""
    ys = torch.nonzero(mask.any(dim=1)).flatten()
    xs = torch.nonzero(mask.any(dim=0)).flatten()
    if len(ys) == 0:
        return None
    return [int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1]


# Impact Pack's SEG layout (ComfyUI-Impact-Pack core.py); declared here so no import is needed.
SEG = namedtuple("SEG", ["cropped_image", "cropped_mask", "confidence", "crop_region", "bbox",
                         "label", "control_net_wrapper"], defaults=[None])


def to_segs(segments: Segments, images: torch.Tensor) -> tuple:
    """Impact Pack SEGS: `((H, W), [SEG, ...])` with one SEG per named mask.

    `images` is the `[B,H,W,3]` batch. `cropped_image` is `[1,h,w,3]` float, `cropped_mask`
    `[h,w]` float32 numpy, `crop_region` and `bbox` are `[x0, y0, x1, y1]`. Impact's SEGS has
    no image index, so for a batch it lists the segments of every image in batch order."""
    segs = []
    for rec in segments.records():
        x0, y0, x1, y1 = rec["bbox"]
        b, k = rec["image"], rec["mask"]
        crop = images[b:b + 1, y0:y1, x0:x1, :3].float().cpu()
        mask = segments.masks[b, k, y0:y1, x0:x1].numpy().astype(np.float32)
        segs.append(SEG(crop, mask, rec["score"], [x0, y0, x1, y1], [x0, y0, x1, y1], rec["label"], None))
    return (segments.image_size, segs)


def palette(n: int) -> list[tuple[int, int, int]]:
    """`n` well-spread RGB colours (0..255)."""
    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 0.95)) for i in range(n)]


def draw_overlay(image: torch.Tensor, masks: torch.Tensor, labels: list[Optional[str]],
                 alpha: float = 0.5) -> torch.Tensor:
    """A coloured overlay of one image's masks with each name written at its mask.

    Args:
        image: `[H,W,3]` float 0..1.
        masks: `[K,H,W]` float 0..1.
        labels: K names (None = background, drawn grey without text).
    Returns:
        `[H,W,3]` float32 0..1.
    """
    img = image[..., :3].float().cpu().clamp(0, 1)
    out = img.clone()
    colours = palette(len(labels))
    for k, name in enumerate(labels):
        colour = torch.tensor(colours[k] if name is not None else (128, 128, 128), dtype=torch.float32) / 255
        m = (masks[k].float().cpu() > 0.5)[..., None]
        out = torch.where(m, (1 - alpha) * img + alpha * colour, out)
    pil = Image.fromarray((out.numpy() * 255).round().astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    font = ImageFont.load_default()
    for k, name in enumerate(labels):
        m = masks[k].float().cpu() > 0.5
        if name is None or not bool(m.any()):
            continue
        ys, xs = torch.nonzero(m, as_tuple=True)
        # write at the mask pixel nearest its centroid, so the text sits on the mask
        cy, cx = ys.float().mean(), xs.float().mean()
        i = int(torch.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
        x, y = int(xs[i]), int(ys[i])
        x0, y0, x1, y1 = draw.textbbox((x, y), name, font=font)
        draw.rectangle((x0 - 1, y0 - 1, x1 + 1, y1 + 1), fill=(0, 0, 0))
        draw.text((x, y), name, fill=(255, 255, 255), font=font)
    return torch.from_numpy(np.asarray(pil).astype(np.float32) / 255)
