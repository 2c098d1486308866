"""Naming rules on constructed cases with known answers.

* ``freeseg.assign.assign_paper`` / ``assign_open`` on hand-computed score matrices;
* ``freeseg.vocab.infer_candidates`` against scipy's correlation distance;
* ``freeseg.nouns.caption_words`` (adjective -> head noun);
* ``freeseg.stages.label_segments`` (the stage the FreeSeg-Diff CLIP Label node and the
  orchestrator call) with a
  stand-in CLIP of known semantics (view embedding = its mean colour, word embedding = the
  colour it names): 1, 2 and many names, names the picture does not show, background words,
  ties, and the paper protocol.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial import distance

from freeseg.assign import assign_open, assign_paper
from freeseg.nouns import caption_words
from freeseg.segments import Segments
from freeseg.settings import DEFAULTS, PAPER, FreeSegSettings
from freeseg.stages import ClipParts, NamingInputs, label_segments, name_masks_open, name_masks_paper, open_texts, \
    paper_candidates
from freeseg.vocab import DEFAULT_BACKGROUND, cached_embed, class_embeddings, correlation_distance, \
    infer_candidates, parse_background, pooled_embeddings
from standin_clip import PREPROCESS, StandInClip, colour_embed


def _t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# --------------------------------------------------------------------------- paper protocol

def test_paper_zeroes_non_candidates_after_the_softmax() -> None:
    # 3 masks x 4 classes (rows sum to 1: a softmax over ALL classes).
    probs = _t([[0.50, 0.30, 0.10, 0.10],
                [0.10, 0.20, 0.60, 0.10],
                [0.40, 0.35, 0.05, 0.20]])
    # candidates {1, 3}: column maxima 0.35 (mask 2) and 0.20 (mask 2) -> mask 2 keeps both,
    # takes class 1 (0.35 > 0.20); masks 0 and 1 keep nothing -> background.
    assert assign_paper(probs, [1, 3]) == [None, None, 1]
    # every class a candidate: class 0 -> mask 0 (0.50), class 2 -> mask 1, class 1 -> mask 2
    assert assign_paper(probs, [0, 1, 2, 3]) == [0, 2, 1]
    # the probabilities are NOT renormalised over the candidates: same answer if other
    # columns change, as long as the candidates' columns stay
    other = probs.clone()
    other[:, 0] = other[:, 2] = 0.0
    assert assign_paper(other, [1, 3]) == [None, None, 1]


def test_paper_no_candidates_is_all_background() -> None:
    probs = _t([[0.9, 0.1], [0.2, 0.8]])
    assert assign_paper(probs, []) == [None, None]
    labels, values = name_masks_paper(probs, ["cat", "dog"], [])
    assert labels == [None, None] and values == [0.0, 0.0]


def test_paper_class_kept_by_every_tied_mask() -> None:
    # the official m[m < max] = 0 keeps all masks at a class's maximum
    probs = _t([[0.6, 0.4], [0.6, 0.4], [0.3, 0.7]])
    assert assign_paper(probs, [0, 1]) == [0, 0, 1]


def test_paper_mask_takes_best_remaining_class() -> None:
    # mask 0 likes class 0 best, but mask 1 has class 0's maximum; mask 0 keeps class 2
    # (its own column maximum), mask 1 takes class 0 over class 1 (0.5 > 0.45? no: 0.5 vs 0.45)
    probs = _t([[0.55, 0.05, 0.40],
                [0.50, 0.45, 0.05]])
    # column maxima: class 0 -> mask 0 (0.55); class 1 -> mask 1; class 2 -> mask 0
    assert assign_paper(probs, [0, 1, 2]) == [0, 1]
    # without class 0 as candidate mask 0 takes class 2, mask 1 class 1
    assert assign_paper(probs, [1, 2]) == [2, 1]


def test_name_masks_paper_names_and_errors() -> None:
    probs = _t([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    labels, values = name_masks_paper(probs, ["cat", "dog", "sofa"], ["sofa"])
    assert labels == [None, "sofa"] and values == pytest.approx([0.0, 0.8])
    with pytest.raises(ValueError, match="not in the class list"):
        name_masks_paper(probs, ["cat", "dog", "sofa"], ["horse"])
    with pytest.raises(ValueError, match=r"\[K,2\]"):
        name_masks_paper(probs, ["cat", "dog"], ["cat"])


# --------------------------------------------------------------------------- open rule

def test_open_name_must_beat_background() -> None:
    # columns: name "red", background "wall", "sky"
    scores = _t([[0.05, 0.90, 0.05],   # the wall
                 [0.80, 0.15, 0.05],   # the red square
                 [0.05, 0.15, 0.80]])  # the sky
    assert assign_open(scores, 1) == [None, 0, None]


def test_open_one_name_with_equal_scores_names_no_mask_by_position() -> None:
    # one name and no background: every mask ties; a mask still needs a positive score,
    # and the result does not depend on the mask order
    scores = _t([[1.0], [1.0], [1.0]])
    assert assign_open(scores, 1) == [0, 0, 0]
    # a tie with a background word goes to the background, for every mask alike
    tied = _t([[0.5, 0.5], [0.5, 0.5]])
    assert assign_open(tied, 1) == [None, None]


def test_open_name_on_several_masks_and_threshold() -> None:
    scores = _t([[0.6, 0.3, 0.1],
                 [0.7, 0.2, 0.1],
                 [0.2, 0.3, 0.5]])
    assert assign_open(scores, 2) == [0, 0, None]
    assert assign_open(scores, 2, threshold=0.65) == [None, 0, None]
    labels, values = name_masks_open(scores.float(), ["dog", "cat", "grass"], 2)
    assert labels == ["dog", "dog", None] and values == pytest.approx([0.6, 0.7, 0.0])


def test_open_ties_between_names_go_to_the_first_name() -> None:
    assert assign_open(_t([[0.4, 0.4, 0.2]]), 2) == [0]


def test_open_errors_and_empty() -> None:
    assert assign_open(torch.zeros(0, 3), 1) == []
    assert assign_open(torch.rand(2, 3), 0) == [None, None]
    with pytest.raises(ValueError, match="n_names"):
        assign_open(torch.rand(2, 3), 4)
    scores = torch.tensor([[float("nan"), 0.2], [0.9, 0.1]])
    assert assign_open(scores, 1) == [None, 0]


def test_open_texts_and_background_parsing() -> None:
    assert open_texts(["dog", "Sky"], ["sky", "wall"]) == ["dog", "Sky", "wall"]
    assert parse_background(None) == DEFAULT_BACKGROUND
    assert parse_background("") == ()
    assert parse_background("Sky, wall\nsky,  sea  ") == ("sky", "wall", "sea")
    assert {"sky", "wall", "floor", "ground", "grass", "road", "water"} <= set(DEFAULT_BACKGROUND)


# --------------------------------------------------------------------------- candidates

def _vec(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_correlation_distance_matches_scipy() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 7, generator=gen), torch.randn(4, 7, generator=gen)
    got = correlation_distance(a, b)
    want = np.array([[distance.correlation(x, y) for y in b.numpy()] for x in a.numpy()])
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5)


def test_infer_candidates_rule_against_scipy() -> None:
    # Word/class embeddings along known directions; 3 tokens per text, the mean over ALL of
    # them is what counts (colour_embed: start, colour, start).
    classes = ["red", "green", "blue", "yellow"]
    words = ["tomato", "frog", "orange", "grey"]
    got = infer_candidates(words, classes, colour_embed)
    # reference: scipy correlation of the token means, nearest class per word, keep <= mean
    w = colour_embed(words).mean(1).numpy()
    c = colour_embed([f"A photo of {x}" for x in classes]).mean(1).numpy()
    d = np.array([[distance.correlation(x, y) for y in c] for x in w])
    nearest, arg = d.min(1), d.argmin(1)
    want = sorted({int(j) for j, v in zip(arg, nearest) if v <= nearest.mean()})
    assert got == [classes[j] for j in want]
    # the known answer: tomato -> red, frog -> green (distance 0.001), orange -> yellow (0.14)
    # are under the mean (0.22); grey (no hue) -> yellow at 0.73 is dropped
    assert got == ["red", "green", "yellow"]


def test_infer_candidates_edge_cases() -> None:
    classes = ["red", "green"]
    assert infer_candidates([], classes, colour_embed) == []
    assert infer_candidates(["  "], classes, colour_embed) == []
    assert infer_candidates(["tomato"], [], colour_embed) == []
    # one word: its distance equals the mean, so it is kept
    assert infer_candidates(["frog"], classes, colour_embed) == ["green"]
    # the farther of two matches is above the mean and dropped; equal matches are all kept
    assert infer_candidates(["frog", "orange", "frog"], classes, colour_embed) == ["green"]
    assert infer_candidates(["tomato", "tomato"], classes, colour_embed) == ["red"]
    # each kept class once, in class-list order
    assert infer_candidates(["green", "red", "green"], classes, colour_embed) == ["red", "green"]
    with pytest.raises(ValueError, match="embed"):
        infer_candidates(["frog"], classes, lambda texts: torch.zeros(len(texts), 4))


def test_class_embeddings_prompt_and_multiword_mean() -> None:
    seen: list[list[str]] = []

    def embed(texts: list[str]) -> torch.Tensor:
        seen.append(list(texts))
        return colour_embed(texts)

    emb = class_embeddings(["red", "dining table"], embed)
    assert seen == [["A photo of red", "A photo of dining", "A photo of table"]]
    pooled = pooled_embeddings(["A photo of dining", "A photo of table"], colour_embed)
    torch.testing.assert_close(emb[1], pooled.mean(0))
    assert emb.dtype == torch.float32 and emb.shape == (2, 4)


def test_cached_embed_encodes_each_text_once() -> None:
    calls: list[list[str]] = []

    def embed(texts: list[str]) -> torch.Tensor:
        calls.append(list(texts))
        return colour_embed(texts)

    cached = cached_embed(embed, max_items=3)
    classes = ["red", "green"]
    first = paper_candidates(["a tomato", "a frog"], classes, cached, vocabulary=["tomato", "frog"])
    assert first == paper_candidates(["a tomato", "a frog"], classes, colour_embed, vocabulary=["tomato", "frog"])
    # the class prompts went through the encoder once for both captions
    flat = [t for c in calls for t in c]
    assert flat.count("A photo of red") == 1 and flat.count("A photo of green") == 1
    torch.testing.assert_close(cached(["grey", "red"]), colour_embed(["grey", "red"]))
    cached(["a", "b", "c", "d"])  # evicts the oldest beyond 3
    calls.clear()
    cached(["grey"])
    assert calls == [["grey"]]


def test_caption_words_adjective_stands_for_its_noun() -> None:
    assert caption_words("a large brown dog on the grass") == ["dog", "grass", "dog", "dog"]
    assert caption_words("a cat sitting on a wooden table") == ["cat", "table", "table"]
    assert caption_words("a big, brown and white dog") == ["dog"] * 4
    assert caption_words("") == [] and caption_words("a very nice day") == []


def test_paper_candidates_per_image() -> None:
    got = paper_candidates(["a tomato and a frog", ""], ["red", "green", "blue"], colour_embed,
                           vocabulary=["tomato", "frog"])
    assert got == [["red", "green"], []]


# --------------------------------------------------------------------------- through the stage

H = W = 24


def _scene(*squares: tuple[tuple[float, float, float], slice, slice],
           background: tuple[float, float, float] = (0.5, 0.5, 0.5)) -> tuple[torch.Tensor, torch.Tensor]:
    """A [1,H,W,3] image of ``background`` with coloured squares, and masks [1,K,H,W]: the
    background split into a top and a bottom half, then one mask per square."""
    image = torch.empty(H, W, 3)
    image[:] = torch.tensor(background)
    owner = torch.zeros(H, W, dtype=torch.long)
    owner[H // 2:] = 1
    for i, (colour, rows, cols) in enumerate(squares):
        image[rows, cols] = torch.tensor(colour)
        owner[rows, cols] = 2 + i
    masks = torch.stack([(owner == k).float() for k in range(2 + len(squares))])
    return image[None], masks[None]


RED = ((0.9, 0.1, 0.1), slice(2, 10), slice(14, 22))
GREEN = ((0.0, 1.0, 0.0), slice(14, 22), slice(2, 10))
BLUE = ((0.1, 0.1, 0.9), slice(14, 22), slice(14, 22))


def _label(image: torch.Tensor, masks: torch.Tensor, names: list[str], candidates=None, warn=None,
           model=None, **settings) -> Segments:
    model = model or StandInClip()
    return label_segments(Segments.unlabelled(masks), image, ClipParts(model, PREPROCESS, model.tokenize),
                          DEFAULTS.replace(**settings), NamingInputs([names], candidates), warn=warn)


def test_one_name_names_the_right_mask() -> None:
    """The issue's case: grey picture, red square, one class name -> the square, not mask 0."""
    image, masks = _scene(RED)
    out = _label(image, masks, ["red"])
    assert out.labels == [[None, None, "red"]]
    assert out.scores[0][2] > 0.5 and out.scores[0][:2] == [0.0, 0.0]
    assert out.class_names == [["red"]]


def test_a_name_the_picture_does_not_show_stays_unassigned() -> None:
    image, masks = _scene(RED)
    assert _label(image, masks, ["blue"]).labels == [[None, None, None]]


def test_two_names() -> None:
    image, masks = _scene(RED, GREEN)
    assert _label(image, masks, ["green", "red"]).labels == [[None, None, "red", "green"]]


def test_many_names() -> None:
    image, masks = _scene(RED, GREEN, BLUE)
    names = ["yellow", "blue", "cyan", "red", "magenta", "green", "orange", "dog", "car"]
    assert _label(image, masks, names).labels == [[None, None, "red", "green", "blue"]]


def test_background_word_asked_for_is_a_name_on_every_mask_it_wins() -> None:
    image, masks = _scene(RED)
    # "wall" is a background word (grey in the stand-in); asked for, it names both grey halves
    assert _label(image, masks, ["red", "wall"]).labels == [["wall", "wall", "red"]]
    # not asked for, it only keeps them unnamed
    assert _label(image, masks, ["red"], background=("wall",)).labels == [[None, None, "red"]]


def test_no_background_words_then_best_name_everywhere() -> None:
    image, masks = _scene(RED)
    # with the background list emptied, the lone name wins every mask: no tie is resolved
    # by mask position (mask 0 is not special)
    assert _label(image, masks, ["red"], background=()).labels == [["red", "red", "red"]]


def test_default_rule_and_settings() -> None:
    image, masks = _scene(RED)
    assert DEFAULTS == FreeSegSettings() and DEFAULTS.rule == "open"
    assert DEFAULTS.background == DEFAULT_BACKGROUND
    assert PAPER.rule == "paper" and PAPER.replace(rule="open", refine=DEFAULTS.refine) == DEFAULTS
    with pytest.raises(ValueError, match="rule"):
        FreeSegSettings(rule="closed")
    with pytest.raises(ValueError, match="rule"):
        _label(image, masks, ["red"], rule="closed")


def test_paper_rule_through_the_stage() -> None:
    image, masks = _scene(RED, GREEN)
    classes = ["red", "green", "blue", "grey"]
    out = _label(image, masks, classes, rule="paper", candidates=[["red", "grey"]])
    # grey is a candidate: each class keeps its best mask (a tie between the two grey
    # halves keeps both); green is not a candidate -> its mask is background
    assert out.labels == [["grey", "grey", "red", None]]
    assert out.class_names == [classes]
    # no candidates -> every mask background, CLIP not even run
    model = StandInClip()
    warned: list[int] = []
    none = _label(image, masks, classes, rule="paper", candidates=[[]], warn=lambda fmt, i: warned.append(i),
                  model=model)
    assert none.labels == [[None] * 4] and warned == [0] and model.image_calls == 0
    with pytest.raises(ValueError, match="candidates"):
        _label(image, masks, classes, rule="paper")


def test_paper_rule_end_to_end_from_a_caption() -> None:
    """caption -> words -> candidates (stand-in SD text encoder) -> CLIP over all classes."""
    image, masks = _scene(RED, GREEN)
    classes = ["red", "green", "blue", "yellow"]
    candidates = paper_candidates(["a tomato next to a frog"], classes, colour_embed,
                                  vocabulary=["tomato", "frog"])
    assert candidates == [["red", "green"]]
    out = _label(image, masks, classes, rule="paper", candidates=candidates)
    assert out.labels[0][2:] == ["red", "green"]
    # the grey halves: their best (tiny) column entries are not the column maxima of red/green
    assert out.labels[0][:2] == [None, None]
