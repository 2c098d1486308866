"""The orchestrator: every FreeSeg-Diff stage for a batch, in pipeline order, with the settings
validated once at the entry (as a diffusers pipeline's ``__call__``).

``segment_batch(images, settings, models, class_names)`` is what the ComfyUI Segment Everything
node and the diffusers backend (``freeseg.backends.diffusers.FreeSegPipeline.segment``) call;
the single-stage nodes call the same stages (``freeseg.stages``) with the same settings object.
The runtime parts come in through ``Models``, each behind a small protocol, so nothing here
knows ComfyUI or diffusers:

* ``features``: a ``freeseg.capture.FeatureSource`` (``extract(images, settings)``);
* ``clip``: a ``freeseg.stages.ClipParts`` (None: the masks stay unnamed);
* ``captioner``: a ``Captioner`` (model or getter + processor; None: no captions);
* ``text_embed``: the Stable Diffusion text encoder as ``freeseg.vocab.Embed`` (rule "paper");
* ``progress``: ``total -> ProgressLike``, a fresh progress per stage (None: none).

``naming_inputs`` is the one place that knows what each naming rule needs ("open": the names
asked for; "paper": the full class list, the captions and the text encoder for the candidates).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch

from .capture import FeatureSource
from .features import DiffusionFeatures
from .names import parse_names
from .segments import Segments
from .settings import FreeSegSettings
from .stages import ClipParts, ModelOrGetter, NamingInputs, ProgressLike, caption_images, cluster_batch, \
    label_segments, paper_candidates, refine_segments, split_segments, to_rgb
from .vocab import Embed

__all__ = ["Captioner", "Models", "BatchResult", "naming_inputs", "segment_batch"]


@dataclass(frozen=True)
class Captioner:
    """A BLIP / BLIP-2 captioner: the model (or a getter returning it, called once per image)
    and its processor, as ``freeseg.caption.load_captioner`` returns them."""

    model: ModelOrGetter
    processor: Any


@dataclass
class Models:
    """The runtime parts ``segment_batch`` uses (see the module docstring).

    ``device``: where clustering and refinement run (None: where the features / masks are).
    ``warn``: called as ``warn(fmt, *args)`` for what the log should say (e.g.
    ``logging.Logger.warning``)."""

    features: FeatureSource
    clip: Optional[ClipParts] = None
    captioner: Optional[Captioner] = None
    text_embed: Optional[Embed] = None
    progress: Optional[Callable[[int], ProgressLike]] = None
    device: Optional[Union[str, torch.device]] = None
    warn: Optional[Callable[..., None]] = None


@dataclass
class BatchResult:
    """What ``segment_batch`` gives: the named, refined ``segments`` (masks ``[B,K,H,W]``
    float32 CPU at the images' size), B ``captions`` ("" without a captioner), the B
    ``class_lists`` the masks were named from, the ``features`` and seconds per step."""

    segments: Segments
    captions: list[str]
    class_lists: list[list[str]]
    features: DiffusionFeatures
    timings: dict[str, float] = field(default_factory=dict)


def _check_paper(classes: Sequence[str], embed: Optional[Embed], classes_input: str, embed_input: str) -> None:
    if not classes:
        raise ValueError(f"{classes_input}: the paper rule needs the full class list (e.g. the 20 Pascal VOC "
                         "classes)")
    if embed is None:
        raise ValueError(f"{embed_input}: the paper rule needs the checkpoint's text encoder to pick the candidate "
                         "classes from the captions")


def naming_inputs(settings: FreeSegSettings, class_lists: Sequence[Sequence[str]], captions: Sequence[str] = (),
                  embed: Optional[Embed] = None, classes_input: str = "classes",
                  embed_input: str = "clip") -> NamingInputs:
    """What ``label_segments`` needs under ``settings.rule``.

    "open": ``class_lists`` (B lists: the names asked for per image) as they are. "paper":
    ``class_lists[0]`` is the full class list (the same for every image); the candidates of
    image i come from ``captions[i]`` through ``embed`` (``stages.paper_candidates``).
    ValueError naming ``classes_input`` / ``embed_input`` when the paper rule lacks them."""
    lists = [list(names) for names in class_lists]
    if settings.rule == "open":
        return NamingInputs(lists)
    classes = lists[0] if lists else []
    _check_paper(classes, embed, classes_input, embed_input)
    if len(captions) != len(lists):
        raise ValueError(f"captions: {len(captions)} captions for {len(lists)} images")
    return NamingInputs([list(classes) for _ in lists], paper_candidates(list(captions), classes, embed))


def segment_batch(images: torch.Tensor, settings: FreeSegSettings, models: Models,
                  class_names: Union[str, Sequence[str], None] = None) -> BatchResult:
    """Segment a batch and name its masks.

    Args:
        images: ``[B,H,W,C]`` float 0..1 (C = 1, 3 or 4).
        settings: every knob (validated when it was made).
        models: the runtime parts.
        class_names: rule "open": names added to every image's caption nouns (a list, or a
            comma-separated string); without a captioner the only names. Rule "paper": the
            full class list; the candidates come from the caption (none without a captioner:
            every mask background).
    Returns:
        ``BatchResult``.
    """
    # 0. Validate the inputs once.
    if not isinstance(settings, FreeSegSettings):
        raise TypeError(f"settings: expected FreeSegSettings, got {type(settings).__name__}")
    pixels = to_rgb(images)
    b = pixels.shape[0]
    names = parse_names(class_names)
    if settings.rule == "paper":
        _check_paper(names, models.text_embed, "class_names", "text encoder")
    captioner = models.captioner if settings.use_caption else None
    timings: dict[str, float] = {}
    t_start = time.perf_counter()

    def progress() -> Optional[ProgressLike]:
        return models.progress(b) if models.progress is not None else None

    # 1. Caption: the captions, and (open rule) each image's names = caption nouns + class_names.
    t0 = time.perf_counter()
    user = names if settings.rule == "open" else []
    if captioner is None:
        captions, lists = caption_images(pixels, None, None, user)
    else:
        captions, lists = caption_images(pixels, captioner.model, captioner.processor, user,
                                         settings.max_new_tokens, settings.num_beams, settings.caption_prompt,
                                         progress=progress(), min_new_tokens=settings.min_new_tokens)
    if settings.rule == "paper":
        lists = [list(names) for _ in range(b)]
    timings["caption"] = time.perf_counter() - t0

    # 2. Diffusion features.
    t0 = time.perf_counter()
    features = models.features.extract(pixels, settings)
    timings["features"] = time.perf_counter() - t0

    # 3. Cluster into class-agnostic masks.
    t0 = time.perf_counter()
    segments = cluster_batch(features, settings, lists, progress=progress(), device=models.device)
    timings["cluster"] = time.perf_counter() - t0

    # 4. Name the masks with CLIP.
    t0 = time.perf_counter()
    if models.clip is not None:
        naming = naming_inputs(settings, lists, captions, models.text_embed, "class_names", "text encoder")
        segments = label_segments(segments, pixels, models.clip, settings, naming, progress=progress(),
                                  warn=models.warn)
    else:
        if models.warn is not None:
            models.warn("FreeSeg-Diff: no CLIP model given; the masks stay unnamed")
        segments = Segments(segments.masks, segments.labels, segments.scores, lists, segments.instances,
                            segments.shared)
    timings["label"] = time.perf_counter() - t0

    # 5. Refine along image edges.
    t0 = time.perf_counter()
    segments = refine_segments(segments, pixels, settings.refine, progress=progress(), device=models.device)
    timings["refine"] = time.perf_counter() - t0

    # 6. Instances: named masks split into their connected parts.
    segments = split_segments(segments, settings)
    timings["total"] = time.perf_counter() - t_start
    return BatchResult(segments, captions, [list(n) for n in segments.class_names], features, timings)
