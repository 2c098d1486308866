"""Runtime-free FreeSeg-Diff stages shared by the ComfyUI nodes (`nodes/`) and the diffusers
pipeline (`freeseg.backends.diffusers`).

Everything here is plain torch on top of the other `freeseg` modules; the model runtime
(ComfyUI's ModelPatcher, diffusers modules) stays with the caller. Where a stage loops over a
batch it takes an optional ``progress`` object with ``check()`` (called before each image;
may raise to interrupt) and ``step()`` (called after each image), which is exactly the
interface of the nodes' ``Progress`` class. Where a stage needs a model that a runtime may
move around (ComfyUI offloads), it accepts either the model or a zero-argument callable that
returns it ready for use (called once per image, as the nodes' ``load_to_device`` needs).

Stages, in pipeline order:

* ``caption_images``: BLIP / BLIP-2 caption per image -> class names (caption nouns + user names);
* ``resize_square`` / ``seeded_noise``: the input side of the UNet pass;
* ``select_blocks`` / ``captured_to_features``: captured UNet layer outputs -> feature grid;
* ``cluster_segments``: feature grid -> class-agnostic masks at the image size;
* ``name_masks`` / ``label_segments``: CLIP scores -> one name (or background) per mask;
* ``refine_segments``: CRF / guided-filter refinement.

``FreeSegSettings`` (and ``PAPER``, its defaults) holds the knobs of all stages with the
settings of the paper's released code (equal to the node defaults).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Protocol, Sequence, Union

import torch
import torch.nn.functional as F

from .assign import assign_labels
from .caption import (PAPER_MAX_NEW_TOKENS, PAPER_MIN_NEW_TOKENS, PAPER_NUM_BEAMS, PAPER_PROMPT,
                      check_caption_options, generate_captions)
from .clip_label import CROP_MODES, PROMPTS, encode_names, score_masks
from .cluster import METHODS as CLUSTER_METHODS
from .cluster import cluster_features, labels_to_masks
from .features import SOURCE_QUERIES, SOURCES, DiffusionFeatures, aggregate_maps, block_factor, \
    tokens_to_map
from .nouns import extract_nouns
from .refine import REFINE_METHODS, refine_masks
from .segments import Segments

__all__ = [
    "FreeSegSettings", "PAPER", "ProgressLike", "to_rgb", "parse_names", "class_lists_for_batch",
    "merge_names", "caption_images", "resize_square", "seeded_noise", "select_blocks",
    "captured_to_features", "cluster_segments", "name_masks", "label_segments", "refine_segments",
]


# ------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FreeSegSettings:
    """Every knob of the FreeSeg-Diff stages. The defaults (``PAPER``) are the paper's
    released-code settings and equal the ComfyUI node defaults.

    Attributes:
        resolution: side of the square the image is resized to (bicubic) before VAE encoding.
        timestep: diffusion timestep of the single UNet pass (0..999; 0 = almost clean).
        source: feature source, one of ``freeseg.features.SOURCES`` (paper: cross-attention
            queries of the latent/4 blocks).
        seed: seed of the UNet-pass noise (image i of a batch uses ``seed + i``) and of the
            k-means++ start.
        n_clusters: masks per image (paper: 4).
        cluster_method: "kmeans" (paper) or "agglomerative".
        n_init: k-means restarts (paper / sklearn default: 10).
        crop_mode: CLIP view of a mask: "masked" (paper: image with outside zeroed) or "bbox".
        prompt: CLIP text: "bare" names (paper) or "ensemble" templates.
        threshold: a mask whose chosen CLIP probability is below this stays background.
        refine: "crf" (paper), "guided" or "none".
        use_caption: caption the image (when a captioner is loaded) and add its nouns to the
            class names.
        max_new_tokens: longest caption, in generated tokens (the prompt not counted; paper:
            26, LAVIS's max_length 30 less [DEC] and the prompt's 3 tokens).
        min_new_tokens: shortest caption, in generated tokens (paper: 6, LAVIS's
            min_length 10 less the same 4 tokens).
        num_beams: beam width of caption decoding (paper: 3).
        caption_prompt: text prompt that conditions the caption and is removed from it
            (paper: "a picture of "; None or "": none).
    """

    resolution: int = 512
    timestep: int = 0
    source: str = SOURCE_QUERIES
    seed: int = 0
    n_clusters: int = 4
    cluster_method: str = "kmeans"
    n_init: int = 10
    crop_mode: str = "masked"
    prompt: str = "bare"
    threshold: float = 0.0
    refine: str = "crf"
    use_caption: bool = True
    max_new_tokens: int = PAPER_MAX_NEW_TOKENS
    min_new_tokens: int = PAPER_MIN_NEW_TOKENS
    num_beams: int = PAPER_NUM_BEAMS
    caption_prompt: Optional[str] = PAPER_PROMPT

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first invalid setting."""
        def positive_int(name: str, value: Any, low: int = 1) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")

        positive_int("resolution", self.resolution, 64)
        if self.resolution % 64:
            raise ValueError(f"resolution must be a multiple of 64, got {self.resolution}")
        if isinstance(self.timestep, bool) or not isinstance(self.timestep, int) or not 0 <= self.timestep <= 999:
            raise ValueError(f"timestep must be an int in 0..999, got {self.timestep!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        positive_int("n_clusters", self.n_clusters)
        positive_int("n_init", self.n_init)
        check_caption_options(self.caption_prompt, self.max_new_tokens, self.min_new_tokens, self.num_beams)
        choices = {"source": SOURCES, "cluster_method": CLUSTER_METHODS, "crop_mode": CROP_MODES,
                   "prompt": PROMPTS, "refine": REFINE_METHODS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {tuple(allowed)}, got {getattr(self, name)!r}")
        if not isinstance(self.threshold, (int, float)) or isinstance(self.threshold, bool) \
                or not 0.0 <= float(self.threshold) <= 1.0:
            raise ValueError(f"threshold must be a number in 0..1, got {self.threshold!r}")

    def replace(self, **overrides: Any) -> "FreeSegSettings":
        """A copy with some settings changed; TypeError naming an unknown setting."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown setting(s) {unknown}; valid settings: {sorted(known)}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able ``{name: value}``."""
        return dataclasses.asdict(self)


PAPER = FreeSegSettings()
"""The paper preset: BLIP caption with "a picture of " (3 beams, 6..26 new tokens = LAVIS's
min_length 10 / max_length 30), 512 px, timestep 0, cross-attention queries, k-means K=4
(n_init 10), bare names, masked crops, CRF. The captioner itself is the one the caller
loads: the paper's is BLIP base COCO (``Salesforce/blip-image-captioning-base``)."""


class ProgressLike(Protocol):
    """What batch stages call around each image (the nodes' ``Progress`` fits)."""

    def check(self) -> None:
        """Called before each image; may raise to interrupt."""

    def step(self) -> None:
        """Called after each image."""


ModelOrGetter = Union[torch.nn.Module, Callable[[], Any]]


def _get(model: Any) -> Any:
    """The model itself, or what a zero-argument getter returns (see module docstring)."""
    if isinstance(model, torch.nn.Module) or not callable(model):
        return model
    return model()


def _check(progress: Optional[ProgressLike]) -> None:
    if progress is not None:
        progress.check()


def _step(progress: Optional[ProgressLike]) -> None:
    if progress is not None:
        progress.step()


# ------------------------------------------------------------------------------------------
# Images and names
# ------------------------------------------------------------------------------------------

def to_rgb(image: torch.Tensor, name: str = "image") -> torch.Tensor:
    """IMAGE ``[B,H,W,C]`` with C in {1, 3, 4} (grey, RGB, RGBA) -> ``[B,H,W,3]`` float32 0..1.

    Raises ValueError (naming ``name``) for another shape or an empty batch."""
    if image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{name} must be an IMAGE [B,H,W,C] with 1, 3 or 4 channels, got {tuple(image.shape)}")
    if image.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch")
    if image.shape[-1] == 1:
        image = image.expand(-1, -1, -1, 3)
    return image[..., :3].float().clamp(0, 1)


def parse_names(text: Union[str, Iterable[str], None]) -> list[str]:
    """Comma- or newline-separated class names (or an iterable of names) -> stripped list,
    deduplicated case-insensitively, order kept. None -> []."""
    if text is None:
        return []
    parts = text.replace("\n", ",").split(",") if isinstance(text, str) else \
        [p for item in text for p in str(item).replace("\n", ",").split(",")]
    out: list[str] = []
    seen: set[str] = set()
    for part in parts:
        name = " ".join(part.split())
        if name and name.lower() not in seen:
            seen.add(name.lower())
            out.append(name)
    return out


def class_lists_for_batch(text: str, batch: int) -> list[list[str]]:
    """A class-list string (one line per image, names comma-separated; a single line applies
    to every image) -> B lists of names. Raises ValueError when the line count fits neither."""
    lines = [line for line in text.splitlines() if line.strip()] or [""]
    if len(lines) == 1:
        return [parse_names(lines[0]) for _ in range(batch)]
    if len(lines) != batch:
        raise ValueError(f"class_names has {len(lines)} lines but the batch has {batch} images: give one "
                         "line per image, or a single line for all of them")
    return [parse_names(line) for line in lines]


def merge_names(first: Sequence[str], extra: Sequence[str]) -> list[str]:
    """``first`` followed by the names of ``extra`` not already in it (case-insensitive)."""
    out = list(first)
    seen = {n.lower() for n in out}
    for name in extra:
        if name.lower() not in seen:
            seen.add(name.lower())
            out.append(name)
    return out


def caption_images(images: torch.Tensor, captioner: Optional[ModelOrGetter], processor: Any,
                   user_names: Sequence[str] = (), max_new_tokens: int = PAPER_MAX_NEW_TOKENS,
                   num_beams: int = PAPER_NUM_BEAMS, prompt: Optional[str] = PAPER_PROMPT,
                   progress: Optional[ProgressLike] = None, vocabulary: Optional[Iterable[str]] = None,
                   min_new_tokens: int = PAPER_MIN_NEW_TOKENS) -> tuple[list[str], list[list[str]]]:
    """Caption each image and list its class names: the caption's nouns
    (``freeseg.nouns.extract_nouns``) first, then ``user_names`` not already there.

    Args:
        images: ``[B,H,W,3]`` float 0..1.
        captioner: a BLIP / BLIP-2 model (or a getter returning it, once per image); None
            skips captioning (captions "" and the user names alone).
        processor: its processor.
        user_names: names added to every image's list.
        max_new_tokens, min_new_tokens, num_beams, prompt: caption decoding (defaults: the
            paper's; see ``freeseg.caption.generate_captions``).
        vocabulary: noun vocabulary for ``extract_nouns`` (None: its default).

    Returns:
        (B captions, B lists of names).
    Raises ValueError for invalid decoding options before anything runs.
    """
    b = images.shape[0]
    user = list(user_names)
    check_caption_options(prompt, max_new_tokens, min_new_tokens, num_beams)
    if captioner is None:
        return [""] * b, [list(user) for _ in range(b)]
    captions: list[str] = []
    lists: list[list[str]] = []
    for i in range(b):
        _check(progress)
        model = _get(captioner)
        (text,) = generate_captions(model, processor, images[i:i + 1], prompt=prompt,
                                    max_new_tokens=max_new_tokens, num_beams=num_beams,
                                    min_new_tokens=min_new_tokens)
        captions.append(text)
        lists.append(merge_names(extract_nouns(text, vocabulary), user))
        _step(progress)
    return captions, lists


# ------------------------------------------------------------------------------------------
# UNet pass: inputs and captured features
# ------------------------------------------------------------------------------------------

def resize_square(pixels: torch.Tensor, resolution: int) -> torch.Tensor:
    """``[B,H,W,3]`` float 0..1 -> ``[B,3,r,r]`` float, bicubic (no antialias, as
    ``comfy.utils.common_upscale(..., "bicubic", "disabled")``), clamped to 0..1.
    The aspect ratio is not kept (as the paper's ``T.Resize((512, 512))``)."""
    x = pixels.movedim(-1, 1)
    return F.interpolate(x, size=(resolution, resolution), mode="bicubic").clamp(0, 1)


def seeded_noise(shape: Sequence[int], seed: int) -> torch.Tensor:
    """Standard normal noise ``shape`` float32 on the CPU from ``torch.Generator().manual_seed(seed)``
    (device-independent; move it where needed)."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32)


def _tokens(t: torch.Tensor) -> int:
    """Spatial size of a captured output: N of ``[B,N,C]`` tokens or h*w of a ``[B,C,h,w]`` map."""
    return t.shape[1] if t.ndim == 3 else t.shape[-2] * t.shape[-1]


def select_blocks(captured: Mapping[str, torch.Tensor], latent_hw: tuple[int, int],
                  source: str = SOURCE_QUERIES) -> list[str]:
    """Names of the captured layers FreeSeg-Diff uses, in ``captured``'s order.

    ``captured`` maps layer names to ``[B,N,C]`` tokens or ``[B,C,h,w]`` maps. For queries:
    those at latent/4 (the 16x16 blocks at 512 px; the nearest level when the model has none
    there, the coarser one on a tie); for decoder features: those at latent/4 and latent/2."""
    factors = {name: block_factor(_tokens(t), latent_hw) for name, t in captured.items()}
    if not factors:
        raise ValueError("no UNet layer was captured")
    if source == SOURCE_QUERIES:
        best = min(set(factors.values()), key=lambda f: (abs(math.log2(f) - 2), -f))
        wanted = {best}
    else:
        wanted = {2, 4}
    return [name for name in captured if factors[name] in wanted]


def captured_to_features(captured: Mapping[str, torch.Tensor], latent_hw: tuple[int, int],
                         grid: tuple[int, int], source: str = SOURCE_QUERIES) -> tuple[torch.Tensor, list[str]]:
    """Captured layer outputs of one UNet pass -> the feature grid FreeSeg-Diff clusters.

    Selects the layers (``select_blocks``), turns ``[B,N,C]`` tokens into ``[B,C,h,w]`` maps,
    bilinearly resizes each to ``grid`` and concatenates on channels.

    Returns:
        (``[B, sum C_i, grid_h, grid_w]`` float32 on the captured tensors' device, the names
        of the layers used in channel order).
    """
    names = select_blocks(captured, latent_hw, source)
    if not names:
        raise ValueError(f"no captured layer matches source {source!r}")
    maps = [tokens_to_map(captured[n], latent_hw) if captured[n].ndim == 3 else captured[n] for n in names]
    return aggregate_maps(maps, grid), names


# ------------------------------------------------------------------------------------------
# Clustering, naming, refinement
# ------------------------------------------------------------------------------------------

def cluster_segments(features: DiffusionFeatures, n_clusters: int, method: str = "kmeans", seed: int = 0,
                     n_init: int = 10, progress: Optional[ProgressLike] = None,
                     device: Optional[Union[str, torch.device]] = None) -> Segments:
    """Cluster each image's feature grid into ``n_clusters`` class-agnostic masks.

    Args:
        features: ``DiffusionFeatures`` with ``features`` ``[B,C,h,w]``.
        device: where k-means runs (None: the features' device). The k-means++ start is
            drawn from a CPU generator, so the device changes only rounding.
    Returns:
        unlabelled ``Segments`` with masks ``[B,K,H,W]`` float32 {0,1} (CPU) at
        ``features.image_size``; the masks of an image partition it.
    """
    if not isinstance(features, DiffusionFeatures):
        raise TypeError("features: expected DiffusionFeatures (the output of the diffusion-features stage)")
    feats = features.features
    masks = []
    for i in range(feats.shape[0]):
        _check(progress)
        one = feats[i:i + 1] if device is None else feats[i:i + 1].to(device)
        labels = cluster_features(one, n_clusters, method=method, seed=seed, n_init=n_init)
        masks.append(labels_to_masks(labels.cpu(), tuple(features.image_size), n_clusters))
        _step(progress)
    return Segments.unlabelled(torch.cat(masks))


def name_masks(scores: torch.Tensor, names: Sequence[str],
               threshold: float = 0.0) -> tuple[list[Optional[str]], list[float]]:
    """CLIP scores of one image -> a name (or None = background) and its score per mask.

    Args:
        scores: ``[K,N]`` float, K masks x N names (CLIP softmax over names).
        names: the N names.
        threshold: a mask whose chosen score is below this stays background.
    Returns:
        (K names or None, K floats: the chosen score, 0.0 for background), by the paper's rule
        (``freeseg.assign.assign_labels``: each name to its best mask, each mask its best
        remaining name).
    """
    if scores.ndim != 2 or scores.shape[1] != len(names):
        raise ValueError(f"scores must be [K,{len(names)}], got {tuple(scores.shape)}")
    s = scores.detach().float().cpu()
    picks = assign_labels(s, threshold=threshold)
    labels = [names[p] if p is not None else None for p in picks]
    values = [float(s[i, p]) if p is not None else 0.0 for i, p in enumerate(picks)]
    return labels, values


def label_segments(segments: Segments, images: torch.Tensor, clip_model: ModelOrGetter,
                   preprocess_cfg: dict[str, Any], tokenizer: Callable, class_lists: Sequence[Sequence[str]],
                   crop_mode: str = "masked", prompt: str = "bare", threshold: float = 0.0,
                   progress: Optional[ProgressLike] = None,
                   warn: Optional[Callable[..., None]] = None) -> Segments:
    """Name every mask of every image with CLIP from that image's class list.

    Args:
        segments: ``Segments`` with masks ``[B,K,H,W]``.
        images: ``[B,H,W,3]`` float 0..1, the images the segments came from.
        clip_model: an open_clip model (or a getter returning it, called once per image that
            has names); with ``preprocess_cfg`` and ``tokenizer`` from
            ``freeseg.clip_label.load_open_clip``.
        class_lists: B lists of names.
        warn: called as ``warn(fmt, image_index)`` for an image with no names (its masks stay
            unnamed), e.g. ``logging.Logger.warning``.
    Returns:
        new ``Segments`` (same masks) with labels, scores and ``class_names`` = the lists.
    """
    b = segments.batch_size
    if images.shape[0] != b or tuple(images.shape[1:3]) != segments.image_size:
        raise ValueError(f"image: {tuple(images.shape[:3])} does not match the segments "
                         f"({b} images of {segments.image_size}); use the same images")
    if len(class_lists) != b:
        raise ValueError(f"class_lists has {len(class_lists)} lists for {b} images")
    lists = [list(names) for names in class_lists]
    out = Segments(segments.masks, [], [], lists)
    k = segments.masks.shape[1]
    for i in range(b):
        _check(progress)
        names = lists[i]
        if not names:
            if warn is not None:
                warn("FreeSeg-Diff CLIP Label: image %d has no class names; its masks stay unnamed", i)
            out.labels.append([None] * k)
            out.scores.append([0.0] * k)
            _step(progress)
            continue
        model = _get(clip_model)
        text = encode_names(model, tokenizer, names, prompt=prompt)
        scores = score_masks(model, preprocess_cfg, images[i], segments.masks[i], text, crop_mode=crop_mode)
        labels, values = name_masks(scores, names, threshold)
        out.labels.append(labels)
        out.scores.append(values)
        _step(progress)
    return out


def refine_segments(segments: Segments, images: torch.Tensor, method: str = "crf",
                    progress: Optional[ProgressLike] = None,
                    device: Optional[Union[str, torch.device]] = None) -> Segments:
    """Refine every mask of every image (one image at a time) along image edges.

    Args:
        images: ``[B,H,W,3]`` float 0..1, the images the segments came from.
        method: "crf", "guided" or "none" (``freeseg.refine.refine_masks``).
        device: where the refinement runs (None: the masks' device, i.e. the CPU).
    Returns:
        ``Segments`` with the same names over the refined ``[B,K,H,W]`` float32 CPU masks.
    """
    b = segments.batch_size
    if images.shape[0] != b or tuple(images.shape[1:3]) != segments.image_size:
        raise ValueError(f"image: {tuple(images.shape[:3])} does not match the segments "
                         f"({b} images of {segments.image_size}); use the same images")
    out = []
    for i in range(b):
        _check(progress)
        image, masks = images[i:i + 1], segments.masks[i:i + 1]
        if device is not None:
            image, masks = image.to(device), masks.to(device)
        out.append(refine_masks(image, masks, method=method).cpu())
        _step(progress)
    return segments.with_masks(torch.cat(out))
