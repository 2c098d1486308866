"""freeseg.boxes: named segments as core BOUNDING_BOX values and masks drawn from boxes named
back, with known answers."""
from __future__ import annotations

import pytest
import torch

from freeseg.boxes import name_masks, per_image, to_bboxes
from freeseg.segments import Segments


def _segments() -> Segments:
    """Two 20x30 images: image 0 has a named rectangle, an unnamed one and a named but empty
    mask; image 1 has nothing named."""
    masks = torch.zeros(2, 3, 20, 30)
    masks[0, 0, 2:7, 4:14] = 1  # x 4..13, y 2..6
    masks[0, 1, 10:20, 0:30] = 1
    masks[1, 0, 0:5, 0:5] = 1
    labels = [["dog", None, "cat"], [None, None, None]]
    scores = [[0.75, 0.0, 0.5], [0.0, 0.0, 0.0]]
    return Segments(masks, labels, scores)


def test_one_box_list_per_image_in_pixels_with_label_and_score() -> None:
    boxes = to_bboxes(_segments())
    # the empty "cat" mask gives no box; image 1 keeps its (empty) entry
    assert boxes == [[{"x": 4, "y": 2, "width": 10, "height": 5, "label": "dog", "score": 0.75}], []]
    assert all(isinstance(boxes[0][0][k], int) for k in ("x", "y", "width", "height"))


def test_boxes_follow_the_order_of_the_records() -> None:
    masks = torch.zeros(1, 2, 8, 8)
    masks[0, 0, 4:8, 4:8] = 1
    masks[0, 1, 0:2, 0:3] = 1
    seg = Segments(masks, [["b", "a"]], [[0.5, 0.25]])
    assert [b["label"] for b in to_bboxes(seg)[0]] == [r["label"] for r in seg.records()] == ["b", "a"]
    assert to_bboxes(seg)[0][1] == {"x": 0, "y": 0, "width": 3, "height": 2, "label": "a", "score": 0.25}


def test_per_image_reads_the_layouts_sam3_detect_reads() -> None:
    box = {"x": 1, "y": 2, "width": 3, "height": 4}
    assert per_image(box, 2) == [[box], [box]]
    assert per_image([box], 2) == [[box], [box]]
    assert per_image([[box], []], 2) == [[box], []]
    assert per_image([], 2) == [[], []]
    with pytest.raises(ValueError, match="bboxes: 1 per-image box lists for 2"):
        per_image([[box]], 2)
    with pytest.raises(ValueError, match="bboxes: image 0"):
        per_image([{"x": 1}], 1)
    with pytest.raises(ValueError, match="bboxes: expected"):
        per_image("0,0,1,1", 1)


def test_masks_drawn_from_boxes_take_their_names_back() -> None:
    boxes = [[{"x": 0, "y": 0, "width": 2, "height": 2, "label": "dog", "score": 0.75},
              {"x": 2, "y": 2, "width": 2, "height": 2, "label": "cat"}],
             [],
             [{"x": 1, "y": 1, "width": 1, "height": 1}]]
    masks = torch.zeros(3, 4, 4)
    masks[0, 0:2, 0:2] = 1
    masks[1, 2:4, 2:4] = 1
    masks[2, 1, 1] = 1
    seg = name_masks(masks, boxes, 3, (4, 4))
    assert seg.masks.shape == (3, 2, 4, 4)
    assert seg.labels == [["dog", "cat"], [None, None], ["object", None]]
    assert seg.scores == [[0.75, 1.0], [0.0, 0.0], [1.0, 0.0]]
    assert torch.equal(seg.masks[0, 1], masks[1]) and torch.equal(seg.masks[2, 0], masks[2])
    assert not seg.masks[1].any()  # image 1 had no box: it keeps its entry, with nothing in it
    assert [(r["image"], r["label"]) for r in seg.records()] == [(0, "dog"), (0, "cat"), (2, "object")]
    # and back to the same boxes (the masks fill them exactly)
    assert [[{k: b[k] for k in ("x", "y", "width", "height")} for b in f] for f in to_bboxes(seg)] == \
        [[{k: b[k] for k in ("x", "y", "width", "height")} for b in f] for f in boxes]


def test_no_boxes_anywhere_gives_empty_segments_for_every_image() -> None:
    seg = name_masks(torch.zeros(0, 6, 5), [[], []], 2, (6, 5))
    assert seg.batch_size == 2 and seg.masks.shape == (2, 0, 6, 5) and seg.records() == []
    assert to_bboxes(seg) == [[], []]


def test_count_and_size_mismatches_name_both_inputs() -> None:
    boxes = [[{"x": 0, "y": 0, "width": 2, "height": 2, "label": "dog"}] * 2]
    with pytest.raises(ValueError, match=r"masks: 1 mask\(s\) for the 2 box\(es\) in bboxes.*individual_masks"):
        name_masks(torch.zeros(1, 4, 4), boxes, 1, (4, 4))
    with pytest.raises(ValueError, match="masks: .* is not the image size"):
        name_masks(torch.zeros(2, 4, 5), boxes, 1, (4, 4))
