"""Unit tests for freeseg.assign (assign_labels, assigned_scores)."""
from __future__ import annotations

import pytest
import torch

from freeseg.assign import assign_labels, assigned_scores


def _t(rows: list[list[float]]) -> torch.Tensor:
    """[K,N] float64 score matrix from nested lists."""
    return torch.tensor(rows, dtype=torch.float64)


def test_diagonal() -> None:
    scores = _t([[0.8, 0.1, 0.1],
                 [0.1, 0.7, 0.2],
                 [0.2, 0.2, 0.6]])
    assert assign_labels(scores) == [0, 1, 2]


def test_two_masks_prefer_same_name() -> None:
    # Both masks like name 0 best; mask 1 has the higher score for it, so mask 0
    # falls back to its best remaining name (2, not 1).
    scores = _t([[0.5, 0.1, 0.4],
                 [0.9, 0.05, 0.05]])
    assert assign_labels(scores) == [2, 0]


def test_name_kept_only_by_best_mask_even_if_other_mask_loses_it() -> None:
    # Name 1 is the best name of mask 0 but mask 1 scores higher on it; name 0's
    # best mask is mask 1 too, so mask 0 keeps nothing but name 2.
    scores = _t([[0.3, 0.6, 0.1],
                 [0.35, 0.65, 0.0]])
    assert assign_labels(scores) == [2, 1]


def test_candidates_exclude_name() -> None:
    scores = _t([[0.5, 0.4, 0.1],
                 [0.1, 0.3, 0.6]])
    assert assign_labels(scores) == [0, 2]
    assert assign_labels(scores, candidates=[1, 2]) == [1, 2]
    assert assign_labels(scores, candidates=[2]) == [None, 2]
    assert assign_labels(scores, candidates=[]) == [None, None]


def test_candidates_accept_any_iterable_and_duplicates() -> None:
    scores = _t([[0.5, 0.4, 0.1],
                 [0.1, 0.3, 0.6]])
    assert assign_labels(scores, candidates=iter([2, 1, 2])) == [1, 2]
    assert assign_labels(scores, candidates=torch.tensor([1, 2]).tolist()) == [1, 2]


def test_mask_with_nothing_left_is_background() -> None:
    # Mask 2 is never the best mask of any name.
    scores = _t([[0.9, 0.1],
                 [0.1, 0.9],
                 [0.5, 0.5]])
    assert assign_labels(scores) == [0, 1, None]


def test_zero_score_is_background() -> None:
    scores = _t([[1.0, 0.0],
                 [0.0, 0.0]])
    # Name 1's best mask is mask 0 (tie -> lowest index), but mask 0 takes name 0.
    assert assign_labels(scores) == [0, None]
    assert assign_labels(_t([[0.0, 0.0]])) == [None]
    assert assign_labels(_t([[-0.5, -0.1]])) == [None]


def test_threshold() -> None:
    scores = _t([[0.6, 0.4],
                 [0.3, 0.7],
                 [0.1, 0.2]])
    assert assign_labels(scores, threshold=0.0) == [0, 1, None]
    assert assign_labels(scores, threshold=0.65) == [None, 1, None]
    assert assign_labels(scores, threshold=0.7) == [None, 1, None]  # equal is kept
    assert assign_labels(scores, threshold=0.71) == [None, None, None]


def test_threshold_does_not_hand_name_to_next_mask() -> None:
    # Mask 0 is the best mask for name 0 but falls below the threshold; mask 1
    # still cannot take name 0 (several masks never share a name).
    scores = _t([[0.5, 0.5],
                 [0.4, 0.6]])
    assert assign_labels(scores, threshold=0.55) == [None, 1]


def test_ties_between_masks_go_to_lowest_mask() -> None:
    scores = _t([[0.5, 0.5],
                 [0.5, 0.5]])
    # Both names' best mask is mask 0; mask 0 ties between names -> name 0.
    assert assign_labels(scores) == [0, None]


def test_ties_between_names_go_to_lowest_name() -> None:
    scores = _t([[0.1, 0.45, 0.45],
                 [0.9, 0.05, 0.05]])
    assert assign_labels(scores) == [1, 0]


def test_more_masks_than_names() -> None:
    scores = _t([[0.9, 0.1],
                 [0.2, 0.8],
                 [0.7, 0.3],
                 [0.4, 0.6]])
    out = assign_labels(scores)
    assert out == [0, 1, None, None]
    used = [j for j in out if j is not None]
    assert len(used) == len(set(used))


def test_more_names_than_masks() -> None:
    scores = _t([[0.1, 0.2, 0.6, 0.1],
                 [0.1, 0.1, 0.7, 0.1]])
    assert assign_labels(scores) == [1, 2]


def test_no_names() -> None:
    assert assign_labels(torch.zeros(3, 0)) == [None, None, None]


def test_no_masks() -> None:
    assert assign_labels(torch.zeros(0, 4)) == []


def test_nan_scores_unavailable() -> None:
    scores = _t([[float("nan"), 0.4],
                 [0.3, 0.2]])
    assert assign_labels(scores) == [1, 0]


def test_never_shares_a_name_on_random_scores() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        scores = torch.rand(7, 5, generator=g).softmax(dim=1)
        out = assign_labels(scores)
        assert len(out) == 7
        used = [j for j in out if j is not None]
        assert len(used) == len(set(used))
        for k, j in enumerate(out):
            if j is not None:
                assert int(scores[:, j].argmax()) == k


def test_accepts_fp16_and_float64() -> None:
    scores = _t([[0.8, 0.2], [0.3, 0.7]])
    assert assign_labels(scores.half()) == [0, 1]
    assert assign_labels(scores.double()) == [0, 1]


def test_error_not_2d() -> None:
    with pytest.raises(ValueError, match=r"scores must be \[K,N\]"):
        assign_labels(torch.zeros(2, 3, 4))


@pytest.mark.parametrize("bad", [3, -1])
def test_error_candidate_out_of_range(bad: int) -> None:
    with pytest.raises(ValueError, match=f"candidate index {bad}"):
        assign_labels(torch.zeros(2, 3), candidates=[0, bad])


def test_error_candidate_not_int() -> None:
    with pytest.raises(ValueError, match="candidate index"):
        assign_labels(torch.zeros(2, 3), candidates=[0.5])


def test_error_candidate_out_of_range_with_no_names() -> None:
    with pytest.raises(ValueError, match="candidate index 0"):
        assign_labels(torch.zeros(2, 0), candidates=[0])


def test_assigned_scores() -> None:
    scores = _t([[0.5, 0.1, 0.4],
                 [0.9, 0.05, 0.05],
                 [0.2, 0.2, 0.2]])
    assignment = assign_labels(scores)
    assert assignment == [2, 0, 1]
    assert assigned_scores(scores, assignment) == pytest.approx([0.4, 0.9, 0.2])
    assert assigned_scores(scores, [None, 0, None]) == pytest.approx([0.0, 0.9, 0.0])


def test_assigned_scores_errors() -> None:
    scores = _t([[0.5, 0.5]])
    with pytest.raises(ValueError, match="length"):
        assigned_scores(scores, [0, 1])
    with pytest.raises(ValueError, match=r"assignment\[0\]"):
        assigned_scores(scores, [2])
