"""Vocabularies of the naming stage: the paper's candidate classes, the users' background words.

* ``infer_candidates``: the official FreeSeg-Diff closed-vocabulary step that keeps, from a
  dataset's full class list, the classes the caption talks about. Each caption word
  (``freeseg.nouns.caption_words``) and each class prompt ``"A photo of {class}"`` is
  encoded with the Stable Diffusion checkpoint's own text encoder and mean-pooled over all
  token positions; a word goes to the class at the smallest correlation distance; the
  match is kept when that distance is at most the mean of all words' smallest distances.
* ``DEFAULT_BACKGROUND``: the stuff words the open-vocabulary rule
  (``freeseg.assign.assign_open``) scores beside the user's names, so a name only lands on
  a mask where it beats the background.

Public API:
    DEFAULT_BACKGROUND, CLASS_TEMPLATE
    infer_candidates(words, classes, embed) -> list[str]
    cached_embed(embed, max_items) -> Embed
    pooled_embeddings(texts, embed) -> Tensor [N,D]
    class_embeddings(classes, embed) -> Tensor [C,D]
    correlation_distance(a, b) -> Tensor [N,C]
    parse_background(text) -> tuple[str, ...]
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Iterable, Sequence, Union

import torch

from .names import parse_names

__all__ = ["CLASS_TEMPLATE", "DEFAULT_BACKGROUND", "Embed", "cached_embed", "class_embeddings", "correlation_distance",
           "infer_candidates", "parse_background", "pooled_embeddings"]

CLASS_TEMPLATE = "A photo of {}"
"""Text of a class for candidate inference (official runner.py; caption words go in bare)."""

DEFAULT_BACKGROUND: tuple[str, ...] = (
    "sky", "wall", "floor", "ceiling", "ground", "grass", "road", "sidewalk", "water", "sea",
    "sand", "snow", "dirt", "field", "mountain", "tree", "building", "fence", "window", "curtain",
)
"""Stuff words of the open-vocabulary rule: a mask whose best word is one of these (and not
one of the names asked for) stays unnamed. Editable on the FreeSeg-Diff CLIP Label node."""

Embed = Callable[[list[str]], torch.Tensor]
"""``embed(texts) -> [N,T,D]`` per-token text embeddings (ComfyUI: the checkpoint CLIP's
``encode_from_tokens`` conditioning; diffusers: the text encoder's ``last_hidden_state``)."""


def cached_embed(embed: Embed, max_items: int = 256) -> Embed:
    """``embed`` with the ``[T,D]`` float32 CPU result of each text remembered (the last
    ``max_items`` texts), so a class list is encoded once for a whole dataset, not per image."""
    memo: "OrderedDict[str, torch.Tensor]" = OrderedDict()

    def cached(texts: list[str]) -> torch.Tensor:
        missing = list(dict.fromkeys(t for t in texts if t not in memo))
        if missing:
            out = embed(missing)
            if not isinstance(out, torch.Tensor) or out.ndim != 3 or out.shape[0] != len(missing):
                return out  # pooled_embeddings names the bad shape
            for text, row in zip(missing, out.detach().float().cpu()):
                memo[text] = row
        rows = []
        for text in texts:
            memo.move_to_end(text)
            rows.append(memo[text])
        while len(memo) > max_items:
            memo.popitem(last=False)
        return torch.stack(rows) if rows else torch.zeros(0, 0, 0)
    return cached


def parse_background(text: Union[str, Iterable[str], None]) -> tuple[str, ...]:
    """Comma- or newline-separated words (or an iterable of words) -> stripped, lowercase,
    deduplicated tuple in order (``freeseg.names.parse_names``, lowercased). None ->
    ``DEFAULT_BACKGROUND``; "" -> ``()`` (no background)."""
    if text is None:
        return DEFAULT_BACKGROUND
    return tuple(name.lower() for name in parse_names(text))


def pooled_embeddings(texts: Sequence[str], embed: Embed) -> torch.Tensor:
    """``[N,D]`` float32: ``embed(texts)`` (``[N,T,D]``) averaged over ALL T token positions
    (padding included, as the official code's ``.mean(1)`` over 77 positions)."""
    out = embed(list(texts))
    if not isinstance(out, torch.Tensor) or out.ndim != 3 or out.shape[0] != len(texts):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"embed: expected a [{len(texts)},T,D] tensor for {len(texts)} texts, got {shape}")
    return out.detach().float().cpu().mean(dim=1)


def class_embeddings(classes: Sequence[str], embed: Embed) -> torch.Tensor:
    """``[C,D]`` float32 pooled embeddings of ``"A photo of {class}"``. A class of several
    words ("dining table") is the mean of its words' pooled ``"A photo of {word}"``
    embeddings, as the official runner.py does."""
    texts: list[str] = []
    spans: list[tuple[int, int]] = []
    for name in classes:
        parts = name.split() or [name]
        spans.append((len(texts), len(texts) + len(parts)))
        texts.extend(CLASS_TEMPLATE.format(p) for p in parts)
    pooled = pooled_embeddings(texts, embed)
    return torch.stack([pooled[a:b].mean(dim=0) for a, b in spans])


def correlation_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[N,C]`` float32 correlation distance ``1 - pearson(a_i, b_j)`` of ``a`` ``[N,D]``
    and ``b`` ``[C,D]`` (``scipy.spatial.distance.correlation``; 0 = same up to scale and
    shift, 2 = opposite)."""
    a = a.float() - a.float().mean(dim=1, keepdim=True)
    b = b.float() - b.float().mean(dim=1, keepdim=True)
    a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return 1.0 - a @ b.T


def infer_candidates(words: Sequence[str], classes: Sequence[str], embed: Embed) -> list[str]:
    """The classes the caption's words point to (official closed-vocabulary candidates).

    Args:
        words: the caption's words (``freeseg.nouns.caption_words``; repeats count).
        classes: the full class list (the dataset's names, no background).
        embed: ``embed(texts) -> [N,T,D]`` per-token embeddings from the Stable Diffusion
            checkpoint's text encoder (see ``Embed``).

    Returns:
        The kept classes, each once, in class-list order (the official ``np.unique`` of the
        kept indices): every word is matched to the class at the smallest correlation
        distance between the word's and ``"A photo of {class}"``'s token-mean embeddings;
        a match is kept when its distance is <= the mean of all words' smallest distances.
        ``[]`` when there are no words or no classes (the official code crashes there).

    The maths is float32; the official code ran it on float16 embeddings, a precision quirk
    that can only flip near-ties.
    """
    words = [w for w in words if w.strip()]
    if not words or not classes:
        return []
    dist = correlation_distance(pooled_embeddings(words, embed), class_embeddings(classes, embed))
    nearest, index = dist.min(dim=1)
    nearest = nearest.double()
    keep = nearest <= nearest.mean()
    kept = {int(i) for i, k in zip(index, keep) if bool(k)}
    return [name for j, name in enumerate(classes) if j in kept]
