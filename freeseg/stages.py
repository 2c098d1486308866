"""Runtime-free FreeSeg-Diff stages shared by the ComfyUI nodes (`nodes/`), the orchestrator
(``freeseg.pipeline``) and the diffusers backend (``freeseg.backends.diffusers``).

Everything here is plain torch on top of the other `freeseg` modules; the model runtime
(ComfyUI's ModelPatcher, diffusers modules) stays with the caller. Where a stage loops over a
batch it takes an optional ``progress`` object with ``check()`` (called before each image;
may raise to interrupt) and ``step()`` (called after each image), which is exactly the
interface of the nodes' ``Progress`` class. Where a stage needs a model that a runtime may
move around (ComfyUI offloads), it accepts either the model or a zero-argument callable that
returns it ready for use (called once per image, as the nodes' ``load_to_device`` needs).
The knobs come in as one ``freeseg.settings.FreeSegSettings``.

Stages, in pipeline order:

* ``caption_images``: BLIP / BLIP-2 caption per image -> class names (caption nouns + user names);
* ``resize_square`` / ``seeded_noise``: the input side of the UNet pass (the capture itself:
  ``freeseg.capture``);
* ``cluster_batch`` (``cluster_segments``): feature grid -> class-agnostic masks at the image size;
* ``paper_candidates``: the paper's candidate classes per image (caption words matched to
  the full class list with the Stable Diffusion text encoder, ``freeseg.vocab``);
* ``name_masks_open`` / ``name_masks_paper`` / ``label_segments``: CLIP scores -> one name
  (or background) per mask, by the open-vocabulary rule (default) or the paper protocol;
* ``refine_segments``: CRF / guided-filter refinement; ``split_segments``: instances.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Protocol, Sequence, Union

import torch
import torch.nn.functional as F

from .assign import assign_open, assign_paper
from .caption import PAPER_MAX_NEW_TOKENS, PAPER_MIN_NEW_TOKENS, PAPER_NUM_BEAMS, PAPER_PROMPT, \
    check_caption_options, generate_captions
from .clip_label import encode_names, score_masks
from .cluster import adaptive_n_clusters, cluster_features, cluster_features_shared, labels_to_masks
from .features import DiffusionFeatures
from .instances import split_instances
from .names import caption_class_names, merge_names
from .nouns import caption_words
from .refine import refine_masks
from .segments import Segments
from .settings import MAX_CLUSTERS, FreeSegSettings
from .vocab import Embed, infer_candidates

__all__ = [
    "ProgressLike", "ClipParts", "NamingInputs", "to_rgb", "caption_images", "resize_square", "seeded_noise",
    "cluster_segments", "cluster_batch", "paper_candidates", "name_masks_open", "name_masks_paper", "open_texts",
    "label_segments", "refine_segments", "split_segments",
]


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


@dataclass(frozen=True)
class ClipParts:
    """The CLIP the naming stage scores with: an open_clip model (or a getter returning it,
    called once per image that is scored), its ``preprocess_cfg`` and ``tokenizer``, as
    ``freeseg.clip_label.load_open_clip`` returns them."""

    model: ModelOrGetter
    preprocess_cfg: dict
    tokenizer: Callable


@dataclass(frozen=True)
class NamingInputs:
    """What the naming stage needs besides the masks, the images and the settings; made by
    ``freeseg.pipeline.naming_inputs`` (the one place that knows what each rule needs).

    Attributes:
        class_lists: B lists of names. Rule "open": the names asked for (the user's and the
            caption's). Rule "paper": the full class list, the same for every image.
        candidates: rule "paper" only: B lists of candidate classes (``paper_candidates``).
    """

    class_lists: list[list[str]]
    candidates: Optional[list[list[str]]] = None


# ------------------------------------------------------------------------------------------
# Images and captions
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
        lists.append(caption_class_names(text, user, vocabulary))
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


def cluster_batch(features: DiffusionFeatures, settings: FreeSegSettings,
                  class_lists: Optional[Sequence[Sequence[str]]] = None, progress: Optional[ProgressLike] = None,
                  device: Optional[Union[str, torch.device]] = None) -> Segments:
    """``cluster_segments`` with the settings' K rule: ``k_from`` "n_clusters" takes
    ``n_clusters`` (0 = automatic, 2..``max_clusters``); "class_names" takes each image's
    ``class_lists`` count + ``class_offset`` (with ``shared_batch``: of all images' names
    merged), at most ``MAX_CLUSTERS`` and the grid's cells. ``shared_batch`` clusters the
    batch together; ``cluster_method``, ``seed``, ``n_init`` as there."""
    b, _, h, w = features.features.shape
    s = settings
    counts: Union[int, list[int]] = s.n_clusters
    if s.k_from == "class_names":
        if class_lists is None or len(class_lists) != b:
            raise ValueError(f"k_from class_names needs one list of class names per image ({b})")
        limit = min(MAX_CLUSTERS, h * w)
        if s.shared_batch:
            merged: list[str] = []
            for names in class_lists:
                merged = merge_names(merged, list(names))
            counts = adaptive_n_clusters(len(merged), s.class_offset, limit)
        else:
            counts = [adaptive_n_clusters(len(names), s.class_offset, limit) for names in class_lists]
    return cluster_segments(features, counts, s.cluster_method, s.seed, s.n_init, progress=progress, device=device,
                            max_clusters=s.max_clusters, shared=s.shared_batch)


def _check_inputs(segments: Segments, images: torch.Tensor,
                  class_lists: Optional[Sequence[Sequence[str]]] = None) -> None:
    """ValueError unless ``images`` ``[B,H,W,3]`` (and ``class_lists``, B lists) fit ``segments``."""
    b = segments.batch_size
    if images.shape[0] != b or tuple(images.shape[1:3]) != segments.image_size:
        raise ValueError(f"image: {tuple(images.shape[:3])} does not match the segments "
                         f"({b} images of {segments.image_size}); use the same images")
    if class_lists is not None and len(class_lists) != b:
        raise ValueError(f"class_lists has {len(class_lists)} lists for {b} images")


def _label_shared(segments: Segments, images: torch.Tensor, clip: ClipParts, class_lists: Sequence[Sequence[str]],
                  settings: FreeSegSettings, progress: Optional[ProgressLike] = None) -> Segments:
    """Name the masks of a batch clustered together (``Segments.shared``) once for the batch,
    so mask k keeps one name in every image (open rule).

    The candidate names are all the images' lists merged (first image's order first). Each
    image's masks are scored with CLIP as in ``label_segments``; a mask's scores are averaged
    over the images where it is not empty, and the open rule (``name_masks_open``, with the
    ``background`` words) names the K averaged rows. Same CLIP cost as per-image naming.

    Returns:
        ``Segments`` (same masks, ``shared`` kept) with the same labels and scores in every
        image and ``class_names`` = the merged list for every image.
    """
    b = segments.batch_size
    names: list[str] = []
    for lst in class_lists:
        names = merge_names(names, list(lst))
    k = segments.masks.shape[1]
    if not names or k == 0:
        return Segments(segments.masks, [[None] * k for _ in range(b)], [[0.0] * k for _ in range(b)],
                        [list(names) for _ in range(b)], [list(i) for i in segments.instances], segments.shared)
    texts = open_texts(names, settings.background)
    total = torch.zeros((k, len(texts)), dtype=torch.float64)
    seen = torch.zeros(k, dtype=torch.float64)
    text = None
    for i in range(b):
        _check(progress)
        model = _get(clip.model)
        if text is None:
            text = encode_names(model, clip.tokenizer, texts, prompt=settings.prompt)
        present = (segments.masks[i].flatten(1).amax(dim=1) > 0).double()
        scores = score_masks(model, clip.preprocess_cfg, images[i], segments.masks[i], text,
                             crop_mode=settings.crop_mode)
        total += scores.detach().double().cpu() * present[:, None]
        seen += present
        _step(progress)
    mean = (total / seen.clamp_min(1)[:, None]).float()
    labels, values = name_masks_open(mean, texts, len(names), settings.threshold)
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


def label_segments(segments: Segments, images: torch.Tensor, clip: ClipParts, settings: FreeSegSettings,
                   naming: NamingInputs, progress: Optional[ProgressLike] = None,
                   warn: Optional[Callable[..., None]] = None) -> Segments:
    """Name every mask of every image with CLIP.

    Args:
        segments: ``Segments`` with masks ``[B,K,H,W]``.
        images: ``[B,H,W,3]`` float 0..1, the images the segments came from.
        clip: the CLIP to score with.
        settings: ``rule``, ``crop_mode``, ``prompt``, ``threshold``, ``background``.
            Rule "open": each mask is scored against its image's names plus the
            ``background`` words (``open_texts``) and takes its best name only where that
            beats every background word (``name_masks_open``); segments clustered as one
            batch (``Segments.shared``) are named once for the batch (mask k keeps one name
            in every image). Rule "paper": each mask is scored against the full class list
            and named by ``name_masks_paper`` from ``naming.candidates``.
        naming: the class lists (and, rule "paper", the candidates).
        warn: called as ``warn(fmt, image_index)`` for an image with no names (open) or no
            candidates (paper): its masks stay unnamed, e.g. ``logging.Logger.warning``.
    Returns:
        new ``Segments`` (same masks) with labels, scores and ``class_names`` = the lists.
    """
    rule = settings.rule
    b = segments.batch_size
    class_lists = naming.class_lists
    _check_inputs(segments, images, class_lists)
    if rule == "open" and segments.shared:
        return _label_shared(segments, images, clip, class_lists, settings, progress)
    candidates = naming.candidates
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
        model = _get(clip.model)
        texts = open_texts(names, settings.background) if rule == "open" else names
        text = encode_names(model, clip.tokenizer, texts, prompt=settings.prompt)
        scores = score_masks(model, clip.preprocess_cfg, images[i], segments.masks[i], text,
                             crop_mode=settings.crop_mode)
        scores = scores * (segments.masks[i].flatten(1).amax(dim=1) > 0).to(scores)[:, None]  # empty: no name
        if rule == "open":
            labels, values = name_masks_open(scores, texts, len(names), settings.threshold)
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


def split_segments(segments: Segments, settings: FreeSegSettings) -> Segments:
    """With ``settings.instances``: each named mask split into its connected parts, parts
    below ``min_area`` dropped (``freeseg.instances.split_instances``); else as is."""
    return split_instances(segments, settings.min_area) if settings.instances else segments
