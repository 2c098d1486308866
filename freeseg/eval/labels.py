"""Mask names -> dataset classes: ``map_label`` and ``labels_to_prediction``.

A segmenter run in closed-vocabulary mode names its masks itself (e.g. from caption nouns:
"a small black dog", "man", "plane"). ``map_label`` maps such a name to a dataset class:
exact class name, then the synonym table ``DEFAULT_SYNONYMS`` ("man" -> person, "plane" ->
aeroplane / airplane, "tv" -> tvmonitor / tv, ...), then the singular form, then the head
word ("small bird" -> bird). Unmapped names and unnamed masks become background. (The
official FreeSeg-Diff code instead matched words to classes by text-embedding similarity.)
``labels_to_prediction`` paints named masks into one class-index label map.

numpy only (torch masks are accepted duck-typed, without a torch import).
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from ..nouns import singular

__all__ = ["DEFAULT_SYNONYMS", "Synonyms", "class_key", "labels_to_prediction", "map_label", "synonym_table"]

Synonyms = Mapping[str, Union[str, Sequence[str]]]
"""Name -> target dataset class name(s), as accepted by ``map_label``."""

DEFAULT_SYNONYMS: dict[str, tuple[str, ...]] = {
    # people
    **{w: ("person",) for w in (
        "man", "woman", "boy", "girl", "child", "kid", "baby", "toddler", "people", "lady",
        "guy", "gentleman", "player", "human", "adult", "teenager", "skier", "surfer",
        "skateboarder", "snowboarder", "rider", "pedestrian", "crowd", "athlete", "worker")},
    # vehicles
    **{w: ("aeroplane", "airplane") for w in (
        "plane", "airplane", "aeroplane", "aircraft", "jet", "airliner", "jetliner")},
    **{w: ("bicycle",) for w in ("bike", "bicycle", "cycle")},
    **{w: ("motorbike", "motorcycle") for w in ("motorbike", "motorcycle", "scooter", "moped")},
    **{w: ("boat",) for w in ("ship", "yacht", "sailboat", "canoe", "kayak", "ferry")},
    **{w: ("car",) for w in ("taxi", "cab", "jeep", "suv", "automobile")},
    **{w: ("train",) for w in ("locomotive", "tram", "railway", "subway")},
    **{w: ("truck",) for w in ("lorry", "pickup")},
    # furniture / indoor
    **{w: ("tvmonitor", "tv") for w in (
        "tv", "television", "monitor", "screen", "tv monitor", "computer monitor")},
    **{w: ("sofa", "couch") for w in ("sofa", "couch")},
    **{w: ("pottedplant", "potted plant") for w in (
        "plant", "potted plant", "houseplant", "house plant", "flowerpot", "flower pot")},
    **{w: ("diningtable", "dining table") for w in (
        "table", "dining table", "dinner table", "kitchen table")},
    **{w: ("chair",) for w in ("armchair", "stool")},
    **{w: ("cell phone",) for w in ("phone", "cellphone", "mobile phone", "smartphone")},
    "fridge": ("refrigerator",), "hair dryer": ("hair drier",), "hairdryer": ("hair drier",),
    "doughnut": ("donut",), "hotdog": ("hot dog",), "hot dog": ("hot dog",),
    "teddy": ("teddy bear",), "ball": ("sports ball",), "racket": ("tennis racket",),
    "racquet": ("tennis racket",), "hydrant": ("fire hydrant",), "mug": ("cup",),
    "purse": ("handbag",), "bag": ("handbag",), "rucksack": ("backpack",),
    "remote control": ("remote",), "ski": ("skis",),
    # animals
    **{w: ("dog",) for w in ("puppy", "pup")},
    **{w: ("cat",) for w in ("kitten", "kitty")},
    **{w: ("cow",) for w in ("cattle", "calf", "bull", "ox", "oxen")},
    **{w: ("sheep",) for w in ("lamb", "ram")},
    **{w: ("horse",) for w in ("pony", "foal")},
    **{w: ("bird",) for w in (
        "parrot", "duck", "seagull", "gull", "pigeon", "eagle", "owl", "chicken", "hen",
        "goose", "swan", "sparrow")},
}
"""Name (any case / spacing) -> candidate dataset class names, first present one wins.

A name listed here is final: if none of its targets is a class of the dataset it maps to
nothing (so "hot dog" never falls back to its head word "dog")."""


def class_key(text: str) -> str:
    """Comparison key: lowercase letters and digits only ("Dining-Table" -> "diningtable")."""
    return re.sub(r"[^a-z0-9]+", "", text.lower())


def synonym_table(synonyms: Optional[Synonyms]) -> dict[str, tuple[str, ...]]:
    """``synonyms`` (``DEFAULT_SYNONYMS`` when None) keyed by ``class_key``, targets as tuples."""
    table = DEFAULT_SYNONYMS if synonyms is None else synonyms
    out: dict[str, tuple[str, ...]] = {}
    for name, targets in table.items():
        out[class_key(name)] = (targets,) if isinstance(targets, str) else tuple(targets)
    return out


def map_label(label: Optional[str], class_names: Sequence[str],
              synonyms: Optional[Synonyms] = None) -> Optional[int]:
    """Dataset class index of a mask name, or None (-> background).

    Tries, for the whole name and then for ever shorter tails of it ("a small black dog" ->
    "small black dog" -> "black dog" -> "dog"), each as written and with its last word made
    singular: (1) a class name, compared on letters and digits only ("dining table" ==
    "diningtable"); (2) the synonym table (``DEFAULT_SYNONYMS`` when ``synonyms`` is None;
    pass ``{}`` for none), whose entries are final. First hit wins.

    Args:
        label: a mask name, or None.
        class_names: the dataset's C class names (index = class id).
        synonyms: name -> target class name(s).
    """
    if label is None:
        return None
    index: dict[str, int] = {}
    for i, name in enumerate(class_names):
        index.setdefault(class_key(name), i)
    table = synonym_table(synonyms)
    words = re.findall(r"[a-z0-9]+", label.lower())
    for start in range(len(words)):
        tail = words[start:]
        variants = [tail]
        single = singular(tail[-1])
        if single != tail[-1]:
            variants.append(tail[:-1] + [single])
        for variant in variants:
            key = "".join(variant)
            if key in index:
                return index[key]
            if key in table:
                for target in table[key]:
                    if class_key(target) in index:
                        return index[class_key(target)]
                return None
    return None


def _as_numpy(array: Any) -> np.ndarray:
    """numpy view of a numpy array / torch tensor (duck-typed, no torch import) / nested list."""
    if hasattr(array, "detach"):
        array = array.detach().float().cpu().numpy()
    return np.asarray(array)


def labels_to_prediction(masks: Any, labels: Sequence[Optional[str]], class_names: Sequence[str],
                         synonyms: Optional[Synonyms] = None, *,
                         background: int = 0, threshold: float = 0.5) -> np.ndarray:
    """Paint named masks into one class-index map.

    Each pixel takes the class of the mask with the highest value there (ties -> the lowest
    mask index) if that value is >= ``threshold``; otherwise, and for masks whose name is
    None or maps to no class (``map_label``), it is ``background``.

    Args:
        masks: ``[K,H,W]`` bool or float in 0..1 (numpy array or torch tensor).
        labels: K names (or None).
        class_names: the dataset's C class names.
        synonyms: see ``map_label``.
        background: class index of unnamed pixels.
        threshold: a mask covers a pixel where its value is >= threshold.

    Returns:
        ``[H,W]`` int64 class indices.
    """
    m = _as_numpy(masks).astype(np.float32)
    if m.ndim != 3:
        raise ValueError(f"masks must be [K,H,W], got shape {m.shape}")
    if len(labels) != m.shape[0]:
        raise ValueError(f"{m.shape[0]} masks but {len(labels)} labels")
    out = np.full(m.shape[1:], background, dtype=np.int64)
    if m.shape[0] == 0:
        return out
    mapped = [map_label(lab, class_names, synonyms) for lab in labels]
    ids = np.array([background if c is None else c for c in mapped], dtype=np.int64)
    m = np.nan_to_num(m, nan=-np.inf)
    best = m.argmax(axis=0)
    covered = np.take_along_axis(m, best[None], axis=0)[0] >= threshold
    out[covered] = ids[best[covered]]
    return out
