"""freeseg.instances: connected parts of named masks, with known answers."""
from __future__ import annotations

import pytest
import torch

from freeseg.instances import components, split_instances
from freeseg.segments import Segments, to_segs


def _two_blobs() -> torch.Tensor:
    """[40,40] mask: a 10x10 square, a 6x6 square (diagonal neighbour pixel joins nothing), a 1-pixel speck."""
    m = torch.zeros(40, 40)
    m[2:12, 2:12] = 1
    m[20:26, 30:36] = 1
    m[38, 2] = 1
    return m


def test_components_largest_first_and_specks_dropped() -> None:
    parts = components(_two_blobs(), min_area=0.005)  # 8 pixels: the speck (1 px) goes
    assert parts.shape == (2, 40, 40)
    assert parts[0].sum() == 100 and parts[1].sum() == 36
    assert parts[0, 5, 5] == 1 and parts[1, 22, 32] == 1
    keep_all = components(_two_blobs(), min_area=0.0)
    assert keep_all.shape[0] == 3 and keep_all[2, 38, 2] == 1


def test_components_eight_connected_and_largest_always_kept() -> None:
    m = torch.zeros(10, 10)
    m[2, 2] = m[3, 3] = 1  # diagonal neighbours: one part
    parts = components(m, min_area=0.5)
    assert parts.shape == (1, 10, 10) and parts[0].sum() == 2
    assert components(torch.zeros(5, 5)).shape == (0, 5, 5)


def test_components_keep_soft_values() -> None:
    m = torch.zeros(20, 20)
    m[2:6, 2:6] = 1.0
    m[2:6, 6] = 0.3  # soft edge of the first square
    m[14:18, 14:18] = 0.9
    m[13, 14:18] = 0.2  # soft edge of the second square
    parts = components(m, min_area=0.0)
    assert parts.shape == (2, 20, 20)
    assert torch.allclose(parts.sum(dim=0), m)
    assert parts[0, 3, 6] == pytest.approx(0.3) and parts[1, 13, 15] == pytest.approx(0.2)


def test_components_refuses_bad_min_area() -> None:
    for bad in (-0.1, 1.0, True, "0.1"):
        with pytest.raises(ValueError, match="min_area"):
            components(torch.zeros(4, 4), bad)


def test_split_instances_entries_labels_records_segs() -> None:
    b, h, w = 2, 40, 40
    masks = torch.zeros(b, 3, h, w)
    masks[0, 0] = _two_blobs()          # dog: 2 parts + speck
    masks[0, 1] = 1 - _two_blobs()      # background (unnamed): kept whole
    masks[1, 0, 5:15, 5:15] = 1         # dog: 1 part
    masks[1, 2, 20:30, 20:30] = 1       # cat: 1 part
    seg = Segments(masks, [["dog", None, None], ["dog", None, "cat"]], [[0.9, 0.0, 0.0], [0.8, 0.0, 0.7]],
                   [["dog", "cat"], ["dog", "cat"]])
    out = split_instances(seg, min_area=0.005)
    assert out.masks.shape == (2, 4, h, w)
    assert out.labels == [["dog", "dog", None, None], ["dog", None, "cat", None]]
    assert out.instances == [[0, 1, None, None], [0, None, 0, None]]
    assert out.scores[0][:2] == [0.9, 0.9]
    assert out.masks[0, 3].sum() == 0  # padding
    assert torch.equal(out.masks[0, 2], masks[0, 1])
    records = out.records()
    assert [(r["image"], r["label"], r["instance"], r["area"]) for r in records] == \
        [(0, "dog", 0, 100), (0, "dog", 1, 36), (1, "dog", 0, 100), (1, "cat", 0, 100)]
    assert records[1]["bbox"] == [30, 20, 36, 26]
    images = torch.rand(b, h, w, 3)
    size, segs = to_segs(out, images)
    assert size == (h, w) and [s.label for s in segs] == ["dog", "dog", "dog", "cat"]
    assert segs[1].crop_region == [30, 20, 36, 26]
    assert "instance" not in seg.records()[0]  # unsplit segments: no instance field
