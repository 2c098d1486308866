"""Unit tests for freeseg.assign: the paper's rule (assign_paper) on hand-computed score
matrices, and assigned_scores. (The open rule and more paper cases: tests/unit/test_naming.py.)"""
from __future__ import annotations

import pytest
import torch

from freeseg.assign import assign_paper, assigned_scores


def _t(rows: list[list[float]]) -> torch.Tensor:
    """[K,N] float64 score matrix from nested lists."""
    return torch.tensor(rows, dtype=torch.float64)


def _all(scores: torch.Tensor) -> list[int]:
    return list(range(scores.shape[1]))


def test_diagonal() -> None:
    scores = _t([[0.8, 0.1, 0.1],
                 [0.1, 0.7, 0.2],
                 [0.2, 0.2, 0.6]])
    assert assign_paper(scores, _all(scores)) == [0, 1, 2]


def test_two_masks_prefer_same_name() -> None:
    # Both masks like name 0 best; mask 1 has the higher score for it, so mask 0
    # falls back to its best remaining name (2, not 1).
    scores = _t([[0.5, 0.1, 0.4],
                 [0.9, 0.05, 0.05]])
    assert assign_paper(scores, _all(scores)) == [2, 0]


def test_name_kept_only_by_best_mask_even_if_other_mask_loses_it() -> None:
    # Name 1 is the best name of mask 0 but mask 1 scores higher on it; name 0's
    # best mask is mask 1 too, so mask 0 keeps nothing but name 2.
    scores = _t([[0.3, 0.6, 0.1],
                 [0.35, 0.65, 0.0]])
    assert assign_paper(scores, _all(scores)) == [2, 1]


def test_candidates_exclude_name() -> None:
    scores = _t([[0.5, 0.4, 0.1],
                 [0.1, 0.3, 0.6]])
    assert assign_paper(scores, [0, 1, 2]) == [0, 2]
    assert assign_paper(scores, [1, 2]) == [1, 2]
    assert assign_paper(scores, [2]) == [None, 2]
    assert assign_paper(scores, []) == [None, None]


def test_candidates_accept_any_iterable_and_duplicates() -> None:
    scores = _t([[0.5, 0.4, 0.1],
                 [0.1, 0.3, 0.6]])
    assert assign_paper(scores, iter([2, 1, 2])) == [1, 2]
    assert assign_paper(scores, torch.tensor([1, 2]).tolist()) == [1, 2]


def test_mask_with_nothing_left_is_background() -> None:
    # Mask 2 is never the best mask of any name.
    scores = _t([[0.9, 0.1],
                 [0.1, 0.9],
                 [0.5, 0.5]])
    assert assign_paper(scores, [0, 1]) == [0, 1, None]


def test_zero_score_is_background() -> None:
    assert assign_paper(_t([[1.0, 0.0], [0.0, 0.0]]), [0, 1]) == [0, None]
    assert assign_paper(_t([[0.0, 0.0]]), [0, 1]) == [None]


def test_ties_between_masks_keep_the_name_on_every_tied_mask() -> None:
    # the official m[m < column max] = 0 keeps every mask at the maximum
    scores = _t([[0.5, 0.5],
                 [0.5, 0.5]])
    assert assign_paper(scores, [0, 1]) == [0, 0]


def test_ties_between_names_go_to_lowest_name() -> None:
    scores = _t([[0.1, 0.45, 0.45],
                 [0.9, 0.05, 0.05]])
    assert assign_paper(scores, [0, 1, 2]) == [1, 0]


def test_more_masks_than_names() -> None:
    scores = _t([[0.9, 0.1],
                 [0.2, 0.8],
                 [0.7, 0.3],
                 [0.4, 0.6]])
    assert assign_paper(scores, [0, 1]) == [0, 1, None, None]


def test_more_names_than_masks() -> None:
    scores = _t([[0.1, 0.2, 0.6, 0.1],
                 [0.1, 0.1, 0.7, 0.1]])
    assert assign_paper(scores, _all(scores)) == [1, 2]


def test_no_names_no_masks() -> None:
    assert assign_paper(torch.zeros(3, 0), []) == [None, None, None]
    assert assign_paper(torch.zeros(0, 4), [0]) == []


def test_nan_scores_unavailable() -> None:
    scores = _t([[float("nan"), 0.4],
                 [0.3, 0.2]])
    assert assign_paper(scores, [0, 1]) == [1, 0]


def test_each_name_only_on_its_best_mask_on_random_scores() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        scores = torch.rand(7, 5, generator=g).softmax(dim=1)
        out = assign_paper(scores, [0, 2, 3])
        assert len(out) == 7
        used = [j for j in out if j is not None]
        assert len(used) == len(set(used)) and set(used) <= {0, 2, 3}
        for k, j in enumerate(out):
            if j is not None:
                assert int(scores[:, j].argmax()) == k


def test_accepts_fp16_and_float64() -> None:
    scores = _t([[0.8, 0.2], [0.3, 0.7]])
    assert assign_paper(scores.half(), [0, 1]) == [0, 1]
    assert assign_paper(scores.double(), [0, 1]) == [0, 1]


def test_error_not_2d() -> None:
    with pytest.raises(ValueError, match=r"scores must be \[K,N\]"):
        assign_paper(torch.zeros(2, 3, 4), [0])


@pytest.mark.parametrize("bad", [3, -1])
def test_error_candidate_out_of_range(bad: int) -> None:
    with pytest.raises(ValueError, match=f"candidate index {bad}"):
        assign_paper(torch.zeros(2, 3), [0, bad])


def test_error_candidate_not_int() -> None:
    with pytest.raises(ValueError, match="candidate index"):
        assign_paper(torch.zeros(2, 3), [0.5])


def test_error_candidate_out_of_range_with_no_names() -> None:
    with pytest.raises(ValueError, match="candidate index 0"):
        assign_paper(torch.zeros(2, 0), [0])


def test_assigned_scores() -> None:
    scores = _t([[0.5, 0.1, 0.4],
                 [0.9, 0.05, 0.05],
                 [0.2, 0.2, 0.2]])
    assignment = assign_paper(scores, [0, 1, 2])
    assert assignment == [2, 0, 1]
    assert assigned_scores(scores, assignment) == pytest.approx([0.4, 0.9, 0.2])
    assert assigned_scores(scores, [None, 0, None]) == pytest.approx([0.0, 0.9, 0.0])


def test_assigned_scores_errors() -> None:
    scores = _t([[0.5, 0.5]])
    with pytest.raises(ValueError, match="length"):
        assigned_scores(scores, [0, 1])
    with pytest.raises(ValueError, match=r"assignment\[0\]"):
        assigned_scores(scores, [2])
