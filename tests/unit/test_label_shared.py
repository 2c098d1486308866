"""Naming a batch clustered together (label_segments of shared segments) and empty masks in label_segments,
on the random-weight open_clip fixture."""
from __future__ import annotations

import pytest
import torch

from freeseg.clip_label import encode_names, load_open_clip, score_masks
from freeseg.segments import Segments
from freeseg.settings import DEFAULTS
from freeseg.stages import ClipParts, NamingInputs, label_segments, name_masks_open, open_texts
from freeseg.vocab import DEFAULT_BACKGROUND
from synthetic import cache


@pytest.fixture(scope="module")
def clip() -> tuple:
    paths = cache.build_all_subprocess()
    return load_open_clip(paths["open_clip_dir"])


def _shared(b: int = 3, h: int = 24, w: int = 32) -> tuple[Segments, torch.Tensor]:
    """3 frames, 3 shared masks (vertical bands moving right); mask 2 is absent from frame 1."""
    masks = torch.zeros(b, 3, h, w)
    for t in range(b):
        masks[t, 0, :, :8 + 2 * t] = 1
        masks[t, 1, :, 8 + 2 * t:] = 1
    masks[0, 1, :, 20:] = 0
    masks[0, 2, :, 20:] = 1
    masks[2, 1, :, 24:] = 0
    masks[2, 2, :, 24:] = 1
    images = torch.rand(b, h, w, 3, generator=torch.Generator().manual_seed(0))
    return Segments.unlabelled(masks, shared=True), images


def test_shared_names_are_the_same_in_every_frame(clip: tuple) -> None:
    model, cfg, tok = clip
    seg, images = _shared()
    lists = [["dog", "cat"], ["cat", "tree"], ["sky"]]
    out = label_segments(seg, images, ClipParts(model, cfg, tok), DEFAULTS, NamingInputs(lists))
    merged = ["dog", "cat", "tree", "sky"]
    assert out.shared and out.class_names == [merged] * 3
    assert out.labels[0] == out.labels[1] == out.labels[2]
    # known answer: the mean over the frames where each mask is present, named once by the open
    # rule (the names beside the background words)
    texts = open_texts(merged, DEFAULT_BACKGROUND)
    text = encode_names(model, tok, texts)
    total, seen = torch.zeros(3, len(texts), dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for t in range(3):
        present = (seg.masks[t].flatten(1).amax(1) > 0).double()
        total += score_masks(model, cfg, images[t], seg.masks[t], text).double() * present[:, None]
        seen += present
    labels, values = name_masks_open((total / seen[:, None]).float(), texts, len(merged))
    assert out.labels[0] == labels
    assert out.scores[0] == pytest.approx(values)
    assert out.masks is seg.masks


def test_shared_without_names_leaves_masks_unnamed(clip: tuple) -> None:
    model, cfg, tok = clip
    seg, images = _shared()
    out = label_segments(seg, images, ClipParts(model, cfg, tok), DEFAULTS, NamingInputs([[], [], []]))
    assert out.labels == [[None] * 3] * 3
    with pytest.raises(ValueError, match="3 images"):
        label_segments(seg, images[:2], ClipParts(model, cfg, tok), DEFAULTS, NamingInputs([[], []]))


def test_empty_masks_get_no_name(clip: tuple) -> None:
    model, cfg, tok = clip
    masks = torch.zeros(1, 4, 16, 16)
    masks[0, 0, :8] = 1
    masks[0, 1, 8:] = 1  # masks 2 and 3 are empty (padding of a batch with fewer clusters)
    seg = Segments.unlabelled(masks)
    out = label_segments(seg, torch.rand(1, 16, 16, 3), ClipParts(model, cfg, tok), DEFAULTS,
                         NamingInputs([["a", "b", "c", "d"]]))
    assert out.labels[0][2] is None and out.labels[0][3] is None
    assert out.scores[0][2] == 0.0 and out.scores[0][3] == 0.0
