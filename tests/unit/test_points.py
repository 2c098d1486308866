"""freeseg.points: parsing pointed positions and picking the segments under them."""
from __future__ import annotations

import pytest
import torch

from freeseg.points import check_points, parse_points, select_at_points
from freeseg.segments import Segments


@pytest.mark.parametrize("text, expected", [
    ("", []),
    ("  ", []),
    ("10,20", [(10.0, 20.0)]),
    ("10,20; 30.5,40", [(10.0, 20.0), (30.5, 40.0)]),
    ("10, 20\n30 ,40", [(10.0, 20.0), (30.0, 40.0)]),
    ("10,20 30,40", [(10.0, 20.0), (30.0, 40.0)]),
    ("(10,20) (30,40)", [(10.0, 20.0), (30.0, 40.0)]),
    ('[{"x": 10, "y": 20}, {"x": 30.5, "y": 40}]', [(10.0, 20.0), (30.5, 40.0)]),
    ('{"x": 3, "y": 4}', [(3.0, 4.0)]),
    ("[[1, 2], [3, 4]]", [(1.0, 2.0), (3.0, 4.0)]),
    ('[[{"x": 1, "y": 2}], [{"x": 3, "y": 4}]]', [(1.0, 2.0), (3.0, 4.0)]),
])
def test_parse_points(text, expected) -> None:
    assert parse_points(text) == expected


@pytest.mark.parametrize("text", ["10", "10,20,30", "a,b", "10;20", '[{"x": 1}]', '[{"x": "1", "y": 2}]',
                                  "10,20 foo", '{"x": 1, "y": NaN}'])
def test_parse_points_refuses(text) -> None:
    with pytest.raises(ValueError, match="points"):
        parse_points(text)


def _segments() -> Segments:
    """2 images of 10x20 (H x W): mask 0 = left half, mask 1 = right half; image 1 swaps them."""
    masks = torch.zeros(2, 2, 10, 20)
    masks[0, 0, :, :10] = 1
    masks[0, 1, :, 10:] = 1
    masks[1, 0, :, 10:] = 1
    masks[1, 1, :, :10] = 1
    return Segments(masks, [["dog", None], ["dog", None]], [[0.5, 0.0], [0.5, 0.0]])


def test_select_at_points_picks_the_segment_under_each_point() -> None:
    seg = _segments()
    mask, picked = select_at_points(seg, [(2.7, 3.0)])  # x=2 is the left half
    assert picked == [[0], [1]]
    assert torch.equal(mask[0], seg.masks[0, 0]) and torch.equal(mask[1], seg.masks[1, 1])
    both, picked = select_at_points(seg, [(2, 3), (15, 9)])
    assert picked == [[0, 1], [0, 1]] and both.min() == 1
    none, picked = select_at_points(seg, [])
    assert picked == [[], []] and none.max() == 0


def test_select_at_points_soft_masks_take_the_strongest() -> None:
    seg = _segments()
    soft = seg.with_masks(seg.masks * 0.4)
    _, picked = select_at_points(soft, [(15, 0)])
    assert picked == [[1], [0]]


def test_points_outside_the_image_are_refused() -> None:
    with pytest.raises(ValueError, match=r"\(20, 3\) is outside the 20x10 image"):
        check_points([(20, 3)], (10, 20))
    with pytest.raises(ValueError, match="outside"):
        select_at_points(_segments(), [(-1, 0)])
    assert check_points([(19.9, 9.99)], (10, 20)) == [(19, 9)]
