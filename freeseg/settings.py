"""Every knob of every FreeSeg-Diff stage in one frozen object, validated once.

``FreeSegSettings`` is what the orchestrator (``freeseg.pipeline.segment_batch``), the
diffusers backend, ``freeseg segment`` and ``freeseg eval`` take; the ComfyUI nodes derive the
min / max of their inputs from the same ranges (``INT_RANGES``, ``FLOAT_RANGES``) and the
options of their combos from ``CHOICES``, so each input has ONE range everywhere.

``PAPER`` is the preset of the paper's released code; ``DEFAULTS`` (``FreeSegSettings()``, the
node defaults) differs from it in two knobs, on purpose: the naming ``rule`` ("open": names
beat a background vocabulary, instead of the paper's closed-vocabulary protocol, which needs a
dataset's full class list) and ``refine`` ("crf_guard": the paper's CRF where the guided filter
agrees, the guided mask where not; the paper's CRF alone erases thin or low-contrast objects of
real photos, see ``freeseg.refine.masks``).

Public API:
    FreeSegSettings, DEFAULTS, PAPER
    RULES, DETAILS, K_FROM, MAX_CLUSTERS, RESOLUTION_STEP, INT_RANGES, FLOAT_RANGES, CHOICES
    parse_setting("NAME=VALUE") -> (name, typed value)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

from .caption import PAPER_MAX_NEW_TOKENS, PAPER_MIN_NEW_TOKENS, PAPER_NUM_BEAMS, PAPER_PROMPT, \
    check_caption_options
from .clip_label import CROP_MODES, PROMPTS
from .cluster import METHODS as CLUSTER_METHODS
from .features import SOURCE_QUERIES, SOURCES
from .names import parse_names
from .refine import REFINE_METHODS
from .vocab import DEFAULT_BACKGROUND

__all__ = ["FreeSegSettings", "DEFAULTS", "PAPER", "RULES", "DETAILS", "K_FROM", "MAX_CLUSTERS",
           "RESOLUTION_STEP", "INT_RANGES", "FLOAT_RANGES", "CHOICES", "parse_setting"]

RULES = ("open", "paper")
"""Naming rules: "open" (``freeseg.assign.assign_open``, the default) and "paper"
(``freeseg.assign.assign_paper``, the official closed-vocabulary protocol)."""

DETAILS = ("paper", "fine")
"""Feature grids: "paper" (resolution/16) and "fine" (resolution/8, plus the latent/2 query blocks)."""

K_FROM = ("n_clusters", "class_names")
"""Where the mask count comes from: ``n_clusters``, or each image's class names + ``class_offset``."""

MAX_CLUSTERS = 64
RESOLUTION_STEP = 64

INT_RANGES: dict[str, tuple[int, Optional[int]]] = {
    "resolution": (128, 2048),  # and a multiple of RESOLUTION_STEP
    "timestep": (0, 999),
    "seed": (0, 2**31 - 1),
    "n_clusters": (0, MAX_CLUSTERS),  # 0 = automatic K in 2..max_clusters
    "max_clusters": (2, MAX_CLUSTERS),
    "class_offset": (-16, 16),
    "n_init": (1, None),  # None: no upper bound
}
"""Inclusive (low, high) of every int setting (the caption's token counts: ``check_caption_options``)."""

FLOAT_RANGES: dict[str, tuple[float, float]] = {
    "threshold": (0.0, 1.0),
    "min_area": (0.0, 0.5),
}
"""Inclusive (low, high) of every float setting."""

CHOICES: dict[str, tuple[str, ...]] = {
    "source": tuple(SOURCES), "cluster_method": tuple(CLUSTER_METHODS), "crop_mode": tuple(CROP_MODES),
    "prompt": tuple(PROMPTS), "rule": RULES, "refine": tuple(REFINE_METHODS), "detail": DETAILS,
    "k_from": K_FROM,
}
"""The allowed values of every choice setting."""

BOOLS = ("use_caption", "shared_batch", "instances")


@dataclass(frozen=True)
class FreeSegSettings:
    """Every knob of the FreeSeg-Diff stages, in pipeline order. The defaults (``DEFAULTS``)
    equal the ComfyUI node defaults; ``PAPER`` is the paper's released-code preset (the same
    but ``rule`` and ``refine``). Invalid values raise ValueError naming the setting when the object is made.

    Attributes:
        use_caption: caption the image (when a captioner is given) and add its nouns to the
            class names.
        max_new_tokens: longest caption, in generated tokens (the prompt not counted; paper:
            26, LAVIS's max_length 30 less [DEC] and the prompt's 3 tokens).
        min_new_tokens: shortest caption, in generated tokens (paper: 6, LAVIS's
            min_length 10 less the same 4 tokens).
        num_beams: beam width of caption decoding (paper: 3).
        caption_prompt: text prompt that conditions the caption and is removed from it
            (paper: "a picture of "; None or "": none).
        resolution: side of the square the image is resized to (bicubic) before VAE encoding
            (128..2048, a multiple of 64).
        timestep: diffusion timestep of the single UNet pass (0..999; 0 = almost clean).
        source: feature source, one of ``freeseg.features.SOURCES`` (paper: cross-attention
            queries of the latent/4 blocks).
        detail: "paper" (a resolution/16 grid) or "fine" (resolution/8, and for the queries
            source the latent/2 blocks too).
        seed: seed of the UNet-pass noise (image i of a batch uses ``seed + i``) and of the
            k-means++ start.
        n_clusters: masks per image (paper: 4); 0 = chosen per image in 2..``max_clusters``.
        max_clusters: largest K tried when ``n_clusters`` is 0.
        k_from: "n_clusters" (K as above) or "class_names" (K = the image's class names +
            ``class_offset``, the official adaptive K).
        class_offset: added to the class count with ``k_from`` "class_names".
        shared_batch: cluster all images of a batch together: mask k is the same segment
            (and, open rule, the same name) in every image.
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
        refine: "crf_guard" (default: the CRF checked by the guided filter), "crf" (paper),
            "crf_joint", "guided" or "none" (``freeseg.refine.refine_masks``).
        instances: split each named mask into its connected parts (``freeseg.instances``).
        min_area: with ``instances``, parts smaller than this fraction of the image are
            dropped (0..0.5; a name keeps its largest part).
    """

    use_caption: bool = True
    max_new_tokens: int = PAPER_MAX_NEW_TOKENS
    min_new_tokens: int = PAPER_MIN_NEW_TOKENS
    num_beams: int = PAPER_NUM_BEAMS
    caption_prompt: Optional[str] = PAPER_PROMPT
    resolution: int = 512
    timestep: int = 0
    source: str = SOURCE_QUERIES
    detail: str = "paper"
    seed: int = 0
    n_clusters: int = 4
    max_clusters: int = 8
    k_from: str = "n_clusters"
    class_offset: int = 1
    shared_batch: bool = False
    cluster_method: str = "kmeans"
    n_init: int = 10
    crop_mode: str = "masked"
    prompt: str = "bare"
    threshold: float = 0.0
    rule: str = "open"
    background: tuple[str, ...] = DEFAULT_BACKGROUND
    refine: str = "crf_guard"
    instances: bool = False
    min_area: float = 0.002

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first invalid setting."""
        for name, (low, high) in INT_RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low \
                    or (high is not None and value > high):
                span = f"in {low}..{high}" if high is not None else f">= {low}"
                raise ValueError(f"{name} must be an int {span}, got {value!r}")
        if self.resolution % RESOLUTION_STEP:
            raise ValueError(f"resolution must be a multiple of {RESOLUTION_STEP}, got {self.resolution}")
        for name, (low, high) in FLOAT_RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not low <= value <= high:
                raise ValueError(f"{name} must be a number in {low}..{high}, got {value!r}")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in BOOLS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        check_caption_options(self.caption_prompt, self.max_new_tokens, self.min_new_tokens, self.num_beams)
        if not isinstance(self.background, tuple) or not all(isinstance(w, str) and w.strip()
                                                              for w in self.background):
            raise ValueError(f"background must be a tuple of non-empty words, got {self.background!r}")

    def replace(self, **overrides: Any) -> "FreeSegSettings":
        """A copy with some settings changed; TypeError naming an unknown setting."""
        known = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            raise TypeError(f"unknown setting(s) {unknown}; valid settings: {sorted(known)}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able ``{name: value}`` (tuples such as ``background`` as lists, as JSON reads them back)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


DEFAULTS = FreeSegSettings()
"""The node defaults: the paper's settings with the open-vocabulary naming rule and the guarded CRF."""

PAPER = FreeSegSettings(rule="paper", refine="crf")
"""The paper preset: BLIP caption with "a picture of " (3 beams, 6..26 new tokens = LAVIS's
min_length 10 / max_length 30), 512 px, timestep 0, cross-attention queries, k-means K=4
(n_init 10), bare names, masked crops, the closed-vocabulary naming protocol (candidates from
the caption, CLIP over the full class list), CRF. The captioner itself is the one the caller
loads: the paper's is BLIP base COCO (``Salesforce/blip-image-captioning-base``)."""

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def parse_setting(text: str) -> tuple[str, Any]:
    """``"NAME=VALUE"`` (the command lines' ``--setting``) -> (name, value typed as the field's
    default: int, float, true/false, a choice, comma-separated words for ``background``, "none"
    for no ``caption_prompt``). ValueError naming the setting for an unknown name or a value
    of the wrong type; the range is checked when the settings are made."""
    name, sep, raw = text.partition("=")
    name = name.strip()
    fields = {f.name: f.default for f in dataclasses.fields(FreeSegSettings)}
    if not sep or name not in fields:
        what = f"unknown setting {name!r}" if sep else "expected NAME=VALUE"
        raise ValueError(f"--setting {text!r}: {what}; settings: {', '.join(fields)}")
    default = fields[name]
    value = raw.strip()
    try:
        if isinstance(default, bool):
            if value.lower() not in _TRUE + _FALSE:
                raise ValueError("expected true or false")
            return name, value.lower() in _TRUE
        if isinstance(default, int):
            return name, int(value)
        if isinstance(default, float):
            return name, float(value)
        if isinstance(default, tuple):
            return name, tuple(n.lower() for n in parse_names(value))
    except ValueError as exc:
        raise ValueError(f"--setting {name}: {raw!r} is not valid ({exc})") from None
    if name == "caption_prompt":
        return name, None if value.lower() == "none" else raw
    return name, value
