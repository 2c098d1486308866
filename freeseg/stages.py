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
* ``paper_candidates``: the paper's candidate classes per image (caption words matched to
  the full class list with the Stable Diffusion text encoder, ``freeseg.vocab``);
* ``name_masks_open`` / ``name_masks_paper`` / ``label_segments``: CLIP scores -> one name
  (or background) per mask, by the open-vocabulary rule (default) or the paper protocol;
* ``refine_segments``: CRF / guided-filter refinement.

``FreeSegSettings`` holds the knobs of all stages. ``PAPER`` is the preset of the paper's
released code; ``DEFAULTS`` (``FreeSegSettings()``, the node defaults) differs from it in one
knob only, on purpose: the naming ``rule`` ("open": names beat a background vocabulary,
instead of the paper's closed-vocabulary protocol, which needs a dataset's full class list).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Protocol, Sequence, Union

import torch
import torch.nn.functional as F

from .assign import assign_open, assign_paper
from .caption import (PAPER_MAX_NEW_TOKENS, PAPER_MIN_NEW_TOKENS, PAPER_NUM_BEAMS, PAPER_PROMPT,
                      check_caption_options, generate_captions)
from .clip_label import CROP_MODES, PROMPTS, encode_names, score_masks
from .cluster import METHODS as CLUSTER_METHODS
from .cluster import cluster_features, cluster_features_shared, labels_to_masks
from .features import SOURCE_QUERIES, SOURCES, DiffusionFeatures, aggregate_maps, output_factor, \
    tokens_to_map, wanted_factors
from .nouns import caption_words, extract_nouns
from .refine import REFINE_METHODS, refine_masks
from .segments import Segments
from .vocab import DEFAULT_BACKGROUND, Embed, infer_candidates

__all__ = [
    "FreeSegSettings", "PAPER", "DEFAULTS", "RULES", "ProgressLike", "to_rgb", "parse_names",
    "class_lists_for_batch", "merge_names", "caption_images", "resize_square", "seeded_noise", "select_blocks",
    "captured_to_features", "cluster_segments", "paper_candidates", "name_masks_open", "name_masks_paper",
    "open_texts", "label_segments", "label_segments_shared", "refine_segments",
]

RULES = ("open", "paper")
"""Naming rules: "open" (``freeseg.assign.assign_open``, the nodes' default) and "paper"
(``freeseg.assign.assign_paper``, the official closed-vocabulary protocol)."""


# ------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FreeSegSettings:
    """Every knob of the FreeSeg-Diff stages. The defaults (``DEFAULTS``) equal the ComfyUI
    node defaults; ``PAPER`` is the paper's released-code preset (the same but ``rule``).

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
        threshold: a mask whose chosen CLIP probability is below this stays background
            (open rule only; the paper protocol has none).
        rule: naming rule, one of ``RULES``: "open" (default: the names given plus the
            ``background`` words are scored, a name lands on a mask only where it beats them)
            or "paper" (the names are a full class list, CLIP softmax over all of it, only
            the caption's candidate classes may be used, each class to its best mask).
        background: the background words of the open rule (``freeseg.vocab.DEFAULT_BACKGROUND``).
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
    rule: str = "open"
    background: tuple[str, ...] = DEFAULT_BACKGROUND
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
                   "prompt": PROMPTS, "refine": REFINE_METHODS, "rule": RULES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {tuple(allowed)}, got {getattr(self, name)!r}")
        if not isinstance(self.threshold, (int, float)) or isinstance(self.threshold, bool) \
                or not 0.0 <= float(self.threshold) <= 1.0:
            raise ValueError(f"threshold must be a number in 0..1, got {self.threshold!r}")
        if not isinstance(self.background, tuple) or not all(isinstance(w, str) and w.strip()
                                                              for w in self.background):
            raise ValueError(f"background must be a tuple of non-empty words, got {self.background!r}")

    def replace(self, **overrides: Any) -> "FreeSegSettings":
        """A copy with some settings changed; TypeError naming an unknown setting."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown setting(s) {unknown}; valid settings: {sorted(known)}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able ``{name: value}`` (tuples such as ``background`` as lists, as JSON reads them back)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


DEFAULTS = FreeSegSettings()
"""The node defaults: the paper's settings with the open-vocabulary naming rule."""

PAPER = FreeSegSettings(rule="paper")
"""The paper preset: BLIP caption with "a picture of " (3 beams, 6..26 new tokens = LAVIS's
min_length 10 / max_length 30), 512 px, timestep 0, cross-attention queries, k-means K=4
(n_init 10), bare names, masked crops, the closed-vocabulary naming protocol (candidates from
the caption, CLIP over the full class list), CRF. The captioner itself is the one the caller
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

    Raises ValueError (naming ``name``) for another shape, an empty batch or NaN / infinite values."""
    if image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{name} must be an IMAGE [B,H,W,C] with 1, 3 or 4 channels, got {tuple(image.shape)}")
    if image.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch")
    if image.is_floating_point() and not bool(torch.isfinite(image).all()):
        raise ValueError(f"{name} holds NaN or infinite pixel values")
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


def select_blocks(captured: Mapping[str, torch.Tensor], latent_hw: tuple[int, int],
                  source: str = SOURCE_QUERIES, fine: bool = False) -> list[str]:
    """Names of the captured layers FreeSeg-Diff uses, in ``captured``'s order.

    ``captured`` maps layer names to ``[B,N,C]`` tokens or ``[B,C,h,w]`` maps. For queries:
    those at latent/4 (the 16x16 blocks at 512 px; the nearest level when the model has none
    there, the coarser one on a tie), plus with ``fine`` those at half that factor (the 32x32
    blocks at 512 px); for decoder features: those at latent/4 and latent/2."""
    factors = {name: output_factor(t, latent_hw) for name, t in captured.items()}
    if not factors:
        raise ValueError("no UNet layer was captured")
    wanted = wanted_factors(factors.values(), source, fine)
    return [name for name in captured if factors[name] in wanted]


def captured_to_features(captured: Mapping[str, torch.Tensor], latent_hw: tuple[int, int],
                         grid: tuple[int, int], source: str = SOURCE_QUERIES,
                         fine: bool = False) -> tuple[torch.Tensor, list[str]]:
    """Captured layer outputs of one UNet pass -> the feature grid FreeSeg-Diff clusters.

    Selects the layers (``select_blocks``, ``fine`` as there), turns ``[B,N,C]`` tokens into
    ``[B,C,h,w]`` maps, bilinearly resizes each to ``grid`` and concatenates on channels.
    (The fine option pairs with a grid twice as fine: resolution/8 instead of /16.)

    Returns:
        (``[B, sum C_i, grid_h, grid_w]`` float32 on the captured tensors' device, the names
        of the layers used in channel order).
    """
    names = select_blocks(captured, latent_hw, source, fine)
    if not names:
        raise ValueError(f"no captured layer matches source {source!r}")
    maps = [tokens_to_map(captured[n], latent_hw) if captured[n].ndim == 3 else captured[n] for n in names]
    return aggregate_maps(maps, grid), names


# ------------------------------------------------------------------------------------------
# Clustering, naming, refinement
# ------------------------------------------------------------------------------------------

def cluster_segments(features: DiffusionFeatures, n_clusters: Union[int, Sequence[int]], method: str = "kmeans",
                     seed: int = 0, n_init: int = 10, progress: Optional[ProgressLike] = None,
                     device: Optional[Union[str, torch.device]] = None, max_clusters: int = 8,
                     shared: bool = False) -> Segments:
    """Cluster each image's feature grid into class-agnostic masks.

    Args:
        features: ``DiffusionFeatures`` with ``features`` ``[B,C,h,w]``.
        n_clusters: K for every image (paper: 4); 0 = chosen from each image's features, in
            2..``max_clusters`` (``freeseg.cluster.auto_cluster_features``); or a list of B
            per-image K (e.g. ``adaptive_n_clusters`` of each image's class list).
        device: where k-means runs (None: the features' device). The k-means++ start is
            drawn from a CPU generator, so the device changes only rounding.
        max_clusters: largest K tried when n_clusters is 0.
        shared: cluster all images together (``cluster_features_shared``): mask k is the
            same segment in every image; n_clusters must then be one int (0 = automatic).
    Returns:
        unlabelled ``Segments`` with masks ``[B,K,H,W]`` float32 {0,1} (CPU) at
        ``features.image_size``; the masks of an image partition it. K is the largest K of
        the batch: an image with fewer clusters (automatic or per-image K), or one a shared
        cluster misses, has all-zero masks there.
    """
    if not isinstance(features, DiffusionFeatures):
        raise TypeError("features: expected DiffusionFeatures (the output of the diffusion-features stage)")
    feats = features.features
    b = feats.shape[0]
    size = tuple(features.image_size)
    if shared:
        if not isinstance(n_clusters, int) or isinstance(n_clusters, bool):
            raise ValueError(f"shared clustering takes one n_clusters for the batch, got {n_clusters!r}")
        _check(progress)
        x = feats if device is None else feats.to(device)
        labels = cluster_features_shared(x, n_clusters, method, seed, n_init, max_clusters=max_clusters).cpu()
        k = n_clusters or int(labels.max()) + 1
        for _ in range(b):
            _step(progress)
        return Segments.unlabelled(labels_to_masks(labels, size, k), shared=True)
    ks = [n_clusters] * b if isinstance(n_clusters, int) else list(n_clusters)
    if len(ks) != b:
        raise ValueError(f"n_clusters has {len(ks)} values for {b} images")
    masks = []
    for i in range(b):
        _check(progress)
        one = feats[i:i + 1] if device is None else feats[i:i + 1].to(device)
        labels = cluster_features(one, ks[i], method=method, seed=seed, n_init=n_init,
                                  max_clusters=max_clusters).cpu()
        masks.append(labels_to_masks(labels, size, ks[i] or int(labels.max()) + 1))
        _step(progress)
    k_max = max(m.shape[1] for m in masks)
    masks = [F.pad(m, (0, 0, 0, 0, 0, k_max - m.shape[1])) for m in masks]
    return Segments.unlabelled(torch.cat(masks))


def _check_inputs(segments: Segments, images: torch.Tensor,
                  class_lists: Optional[Sequence[Sequence[str]]] = None) -> None:
    """ValueError unless ``images`` ``[B,H,W,3]`` (and ``class_lists``, B lists) fit ``segments``."""
    b = segments.batch_size
    if images.shape[0] != b or tuple(images.shape[1:3]) != segments.image_size:
        raise ValueError(f"image: {tuple(images.shape[:3])} does not match the segments "
                         f"({b} images of {segments.image_size}); use the same images")
    if class_lists is not None and len(class_lists) != b:
        raise ValueError(f"class_lists has {len(class_lists)} lists for {b} images")


def label_segments_shared(segments: Segments, images: torch.Tensor, clip_model: ModelOrGetter,
                          preprocess_cfg: dict[str, Any], tokenizer: Callable,
                          class_lists: Sequence[Sequence[str]], crop_mode: str = "masked", prompt: str = "bare",
                          threshold: float = 0.0, progress: Optional[ProgressLike] = None,
                          background: Sequence[str] = DEFAULT_BACKGROUND) -> Segments:
    """Name the masks of a batch clustered together (``Segments.shared``) once for the batch,
    so mask k keeps one name in every image.

    The candidate names are all the images' lists merged (first image's order first). Each
    image's masks are scored with CLIP as in ``label_segments``; a mask's scores are averaged
    over the images where it is not empty, and the open rule (``name_masks_open``, with the
    ``background`` words) names the K averaged rows.
    Same CLIP cost as ``label_segments``.

    Returns:
        ``Segments`` (same masks, ``shared`` kept) with the same labels and scores in every
        image and ``class_names`` = the merged list for every image.
    """
    b = segments.batch_size
    _check_inputs(segments, images, class_lists)
    names: list[str] = []
    for lst in class_lists:
        names = merge_names(names, list(lst))
    k = segments.masks.shape[1]
    if not names or k == 0:
        return Segments(segments.masks, [[None] * k for _ in range(b)], [[0.0] * k for _ in range(b)],
                        [list(names) for _ in range(b)], [list(i) for i in segments.instances], segments.shared)
    total = torch.zeros((k, len(open_texts(names, background))), dtype=torch.float64)
    seen = torch.zeros(k, dtype=torch.float64)
    text = None
    for i in range(b):
        _check(progress)
        model = _get(clip_model)
        if text is None:
            texts = open_texts(names, background)
            text = encode_names(model, tokenizer, texts, prompt=prompt)
        present = (segments.masks[i].flatten(1).amax(dim=1) > 0).double()
        scores = score_masks(model, preprocess_cfg, images[i], segments.masks[i], text, crop_mode=crop_mode)
        total += scores.detach().double().cpu() * present[:, None]
        seen += present
        _step(progress)
    mean = (total / seen.clamp_min(1)[:, None]).float()
    labels, values = name_masks_open(mean, open_texts(names, background), len(names), threshold)
    return Segments(segments.masks, [list(labels) for _ in range(b)], [list(values) for _ in range(b)],
                    [list(names) for _ in range(b)], [list(i) for i in segments.instances], segments.shared)


def paper_candidates(captions: Sequence[str], classes: Sequence[str], embed: Embed,
                     vocabulary: Optional[Iterable[str]] = None) -> list[list[str]]:
    """The paper's candidate classes of each image: ``freeseg.vocab.infer_candidates`` of the
    caption's words (``freeseg.nouns.caption_words``) against the full class list.

    Args:
        captions: B captions ("" gives no candidates).
        classes: the full class list (no background).
        embed: ``texts -> [N,T,D]`` per-token embeddings from the Stable Diffusion text encoder.
        vocabulary: noun vocabulary of ``caption_words`` (None: its default).
    Returns:
        B lists of candidate classes (class-list order).
    """
    return [infer_candidates(caption_words(c, vocabulary), list(classes), embed) for c in captions]


def _check_matrix(scores: torch.Tensor, n: int) -> torch.Tensor:
    if scores.ndim != 2 or scores.shape[1] != n:
        raise ValueError(f"scores must be [K,{n}], got {tuple(scores.shape)}")
    return scores.detach().float().cpu()


def name_masks_open(scores: torch.Tensor, names: Sequence[str], n_names: Optional[int] = None,
                    threshold: float = 0.0) -> tuple[list[Optional[str]], list[float]]:
    """The open-vocabulary rule on the CLIP scores of one image.

    Args:
        scores: ``[K,N]`` float, K masks x N texts (CLIP softmax over all of them): the
            ``n_names`` names asked for first, then the background words.
        names: the N texts.
        n_names: how many of ``names`` are names (None: all, no background).
        threshold: a mask whose winning name scores below this stays background.
    Returns:
        (K names or None = background, K floats: the chosen probability, 0.0 for background),
        by ``freeseg.assign.assign_open``.
    """
    s = _check_matrix(scores, len(names))
    picks = assign_open(s, len(names) if n_names is None else n_names, threshold)
    return ([names[p] if p is not None else None for p in picks],
            [float(s[i, p]) if p is not None else 0.0 for i, p in enumerate(picks)])


def name_masks_paper(probs: torch.Tensor, classes: Sequence[str],
                     candidates: Sequence[str]) -> tuple[list[Optional[str]], list[float]]:
    """The paper's closed-vocabulary protocol on the CLIP scores of one image.

    Args:
        probs: ``[K,C]`` CLIP probabilities of K masks over the FULL class list (softmax over
            all C classes).
        classes: the C classes.
        candidates: the image's candidate classes (``paper_candidates``); names not in
            ``classes`` are an error.
    Returns:
        (K classes or None = background, K floats: the class probability, 0.0 for
        background), by ``freeseg.assign.assign_paper``: non-candidate columns zeroed after
        the softmax, each class to its best mask(s), each mask its best remaining class. No
        candidates -> every mask background.
    """
    s = _check_matrix(probs, len(classes))
    index = {name: j for j, name in enumerate(classes)}
    unknown = [c for c in candidates if c not in index]
    if unknown:
        raise ValueError(f"candidates {unknown} are not in the class list")
    picks = assign_paper(s, [index[c] for c in candidates])
    return ([classes[p] if p is not None else None for p in picks],
            [float(s[i, p]) if p is not None else 0.0 for i, p in enumerate(picks)])


def open_texts(names: Sequence[str], background: Sequence[str]) -> list[str]:
    """The texts of the open rule: ``names`` then the ``background`` words not among them
    (case-insensitive; a background word asked for is a name)."""
    asked = {n.lower() for n in names}
    return list(names) + [w for w in background if w.lower() not in asked]


def label_segments(segments: Segments, images: torch.Tensor, clip_model: ModelOrGetter,
                   preprocess_cfg: dict[str, Any], tokenizer: Callable, class_lists: Sequence[Sequence[str]],
                   crop_mode: str = "masked", prompt: str = "bare", threshold: float = 0.0,
                   progress: Optional[ProgressLike] = None,
                   warn: Optional[Callable[..., None]] = None, rule: str = "open",
                   background: Sequence[str] = DEFAULT_BACKGROUND,
                   candidates: Optional[Sequence[Sequence[str]]] = None) -> Segments:
    """Name every mask of every image with CLIP.

    Args:
        segments: ``Segments`` with masks ``[B,K,H,W]``.
        images: ``[B,H,W,3]`` float 0..1, the images the segments came from.
        clip_model: an open_clip model (or a getter returning it, called once per image that
            is scored); with ``preprocess_cfg`` and ``tokenizer`` from
            ``freeseg.clip_label.load_open_clip``.
        class_lists: B lists of names. Rule "open": the names asked for (the user's and the
            caption's). Rule "paper": the full class list.
        rule: "open" (default): each mask is scored against its image's names plus the
            ``background`` words (``open_texts``) and takes its best name only where that
            beats every background word (``name_masks_open``). "paper": each mask is scored
            against the full class list and named by ``name_masks_paper`` from
            ``candidates``.
        background: background words of the open rule.
        candidates: rule "paper" only: B lists of candidate classes (``paper_candidates``).
        threshold: open rule: a mask whose winning name scores below this stays background.
        warn: called as ``warn(fmt, image_index)`` for an image with no names (open) or no
            candidates (paper): its masks stay unnamed, e.g. ``logging.Logger.warning``.
    Returns:
        new ``Segments`` (same masks) with labels, scores and ``class_names`` = the lists.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    b = segments.batch_size
    _check_inputs(segments, images, class_lists)
    if rule == "paper" and (candidates is None or len(candidates) != b):
        raise ValueError(f"rule 'paper' needs candidates: one list of candidate classes per image ({b})")
    lists = [list(names) for names in class_lists]
    out = Segments(segments.masks, [], [], lists)
    k = segments.masks.shape[1]
    for i in range(b):
        _check(progress)
        names = lists[i]
        empty = not names if rule == "open" else not (names and candidates[i])
        if empty:
            if warn is not None:
                warn("FreeSeg-Diff CLIP Label: image %d has no class names; its masks stay unnamed" if rule == "open"
                     else "FreeSeg-Diff CLIP Label: image %d has no candidate classes; its masks stay background", i)
            out.labels.append([None] * k)
            out.scores.append([0.0] * k)
            _step(progress)
            continue
        model = _get(clip_model)
        texts = open_texts(names, background) if rule == "open" else names
        text = encode_names(model, tokenizer, texts, prompt=prompt)
        scores = score_masks(model, preprocess_cfg, images[i], segments.masks[i], text, crop_mode=crop_mode)
        scores = scores * (segments.masks[i].flatten(1).amax(dim=1) > 0).to(scores)[:, None]  # empty: no name
        if rule == "open":
            labels, values = name_masks_open(scores, texts, len(names), threshold)
        else:
            labels, values = name_masks_paper(scores, names, candidates[i])
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
        method: "crf" (the paper's per-named-mask CRFs: unnamed masks become empty),
            "crf_joint", "guided" or "none" (``freeseg.refine.refine_masks``).
        device: where the refinement runs (None: the masks' device, i.e. the CPU).
    Returns:
        ``Segments`` with the same names over the refined ``[B,K,H,W]`` float32 CPU masks.
    """
    b = segments.batch_size
    _check_inputs(segments, images)
    out = []
    for i in range(b):
        _check(progress)
        image, masks = images[i:i + 1], segments.masks[i:i + 1]
        if device is not None:
            image, masks = image.to(device), masks.to(device)
        named = [[name is not None for name in segments.labels[i]]]
        out.append(refine_masks(image, masks, method=method, named=named).cpu())
        _step(progress)
    return segments.with_masks(torch.cat(out))
