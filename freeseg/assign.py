"""Give each class-agnostic mask a class name (or background) from CLIP scores.

Two rules:

* ``assign_paper``: the official FreeSeg-Diff (arXiv 2403.20105) closed-vocabulary protocol
  exactly: CLIP scores over the FULL class list (softmax over all classes), non-candidate
  columns zeroed after the softmax, each class keeps only its best mask, each mask takes its
  best remaining class, a zero pick is background; no candidates -> every mask background;
* ``assign_open``: the open-vocabulary rule for users (the nodes' default): names scored
  beside background words, a name lands on a mask only where it beats the background.

Public API:
    assign_paper(probs, candidates) -> list[int | None]
    assign_open(scores, n_names, threshold) -> list[int | None]
    assigned_scores(scores, assignment) -> list[float]
"""
from __future__ import annotations

import operator
from typing import Iterable, Sequence

import torch


def _check_scores(scores: torch.Tensor) -> torch.Tensor:
    """Validate a [K,N] score matrix; return it as float64 on CPU (NaN kept)."""
    if not isinstance(scores, torch.Tensor):
        raise ValueError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dim() != 2:
        raise ValueError(f"scores must be [K,N], got shape {tuple(scores.shape)}")
    return scores.detach().to("cpu", torch.float64)


def _as_index(value: object, what: str, n: int) -> int:
    """Return value as an int in [0, n) (ints, numpy/torch integer scalars); else ValueError naming it."""
    try:
        if isinstance(value, bool):
            raise TypeError
        idx = operator.index(value)
    except TypeError:
        raise ValueError(f"{what} {value!r} is not an integer index") from None
    if not 0 <= idx < n:
        raise ValueError(f"{what} {idx} out of range [0, {n})")
    return idx


def _candidate_columns(candidates: Iterable[int], n_names: int) -> torch.Tensor:
    """Boolean [N] mask of candidate names.

    Raises ValueError naming the first index that is not an int in [0, n_names).
    """
    cols = torch.zeros(n_names, dtype=torch.bool)
    for value in candidates:
        cols[_as_index(value, "candidate index", n_names)] = True
    return cols


def assign_paper(probs: torch.Tensor, candidates: Iterable[int]) -> list[int | None]:
    """The official FreeSeg-Diff closed-vocabulary assignment (segment.py), exactly.

    Args:
        probs: ``[K,C]`` CLIP probabilities of K masks over the FULL class list (softmax over
            all C classes, taken before this call).
        candidates: indices of the candidate classes (``freeseg.vocab.infer_candidates``).

    Returns:
        K class indices or None (background). Steps: the columns of non-candidate classes are
        zeroed (after the softmax, so the candidates' probabilities are not renormalised);
        each class keeps only the masks at its column maximum (every tied mask keeps it, as
        the official ``m[m < max] = 0``); each mask takes its best remaining class (ties ->
        the lowest class index, as ``np.argmax``); a mask whose pick is 0 is background. No
        candidates -> every mask is background.
    """
    s = _check_scores(probs)
    k, n = s.shape
    cols = _candidate_columns(candidates, n)
    if k == 0 or n == 0 or not bool(cols.any()):
        return [None] * k
    m = torch.where(cols[None, :] & torch.isfinite(s), s, torch.zeros_like(s))
    m = torch.where(m < m.max(dim=0, keepdim=True).values, torch.zeros_like(m), m)
    choice = torch.argmax(m, dim=1)
    return [int(j) if float(m[i, j]) > 0.0 else None for i, j in enumerate(choice)]


def assign_open(scores: torch.Tensor, n_names: int, threshold: float = 0.0) -> list[int | None]:
    """The open-vocabulary rule: a name goes to a mask only where it beats the background.

    Args:
        scores: ``[K, N+M]`` CLIP probabilities (softmax over all N+M texts) of K masks over
            N names (the ones asked for: the user's and the caption's) followed by M
            background words (``freeseg.vocab.DEFAULT_BACKGROUND`` minus the names).
        n_names: N.
        threshold: a mask whose winning name scores below this stays background.

    Returns:
        K name indices in [0,N) or None. Each mask is decided on its own row: it takes its
        best name when that name's score is strictly higher than every background word's
        (a tie goes to the background) and >= threshold; ties between names go to the name
        listed first. So no tie is ever resolved by mask position, a name the picture does
        not show stays unassigned, and a name may label several masks (an object split over
        two clusters keeps its name on both). Masks with no finite name score are background.
    """
    s = _check_scores(scores)
    k, total = s.shape
    if isinstance(n_names, bool) or not isinstance(n_names, int) or not 0 <= n_names <= total:
        raise ValueError(f"n_names must be an int in [0, {total}], got {n_names!r}")
    if k == 0 or n_names == 0:
        return [None] * k
    s = torch.where(torch.isfinite(s), s, torch.full_like(s, float("-inf")))
    best_name, pick = s[:, :n_names].max(dim=1)  # first maximal index
    if total > n_names:
        best_background = s[:, n_names:].max(dim=1).values
    else:
        best_background = torch.full((k,), float("-inf"), dtype=s.dtype)
    out: list[int | None] = []
    for i in range(k):
        value = float(best_name[i])
        wins = value > float(best_background[i]) and value > 0.0 and value >= threshold
        out.append(int(pick[i]) if wins else None)
    return out


def assigned_scores(scores: torch.Tensor, assignment: Sequence[int | None]) -> list[float]:
    """Score of each mask's assigned name.

    Args:
        scores: [K,N] float tensor, as given to assign_paper / assign_open.
        assignment: length-K list from assign_paper / assign_open (name index or None).

    Returns:
        list of K floats: scores[k, assignment[k]], or 0.0 where None.

    Raises:
        ValueError: scores not 2-D, assignment length != K, or an index outside [0,N).
    """
    s = _check_scores(scores)
    k, n = s.shape
    if len(assignment) != k:
        raise ValueError(f"assignment must have length K={k}, got {len(assignment)}")
    out: list[float] = []
    for i, j in enumerate(assignment):
        if j is None:
            out.append(0.0)
            continue
        out.append(float(s[i, _as_index(j, f"assignment[{i}]", n)]))
    return out


__all__ = ["assign_open", "assign_paper", "assigned_scores"]
