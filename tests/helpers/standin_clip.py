"""A stand-in CLIP of known semantics, with open_clip's interface, for naming tests.

Image embedding of a view = the mean colour of its non-black pixels; text embedding of a word =
the colour it names (``COLOURS``); a word with no colour points along a fourth axis, so it is
at cosine 0 from every view and never wins. ``logit_scale`` is log(100) as in CLIP.
``PREPROCESS`` keeps pixel values as they are (mean 0, std 1) so the colours survive.

Also ``colour_embed``: a stand-in for the Stable Diffusion text encoder's per-token output
(``embed(texts) -> [N,T,D]``) built from the same colours, for candidate inference.
"""
from __future__ import annotations

import math

import torch

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0), "cyan": (0.0, 1.0, 1.0), "magenta": (1.0, 0.0, 1.0),
    "grey": (0.5, 0.5, 0.5), "orange": (1.0, 0.5, 0.0),
    # a few background words with the colour they usually have
    "wall": (0.5, 0.5, 0.5), "sky": (0.4, 0.7, 1.0), "grass": (0.1, 0.8, 0.1), "water": (0.0, 0.3, 0.8),
    # objects of a fixed colour
    "tomato": (0.95, 0.05, 0.0), "frog": (0.05, 0.95, 0.0),
}
PREPROCESS = {"size": (32, 32), "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0),
              "interpolation": "bilinear", "resize_mode": "squash"}


def word_vector(word: str) -> torch.Tensor:
    """[4] float32: the word's colour, or the fourth axis for a word with no colour."""
    if word in COLOURS:
        return torch.tensor([*COLOURS[word], 0.0])
    return torch.tensor([0.0, 0.0, 0.0, 1.0])


class StandInClip(torch.nn.Module):
    """encode_image / encode_text / logit_scale as open_clip models have them."""

    def __init__(self) -> None:
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(100.0)))
        self.words: list[str] = []
        self.image_calls = 0

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """[N,1] int64 ids (the tokenizer open_clip gives with its model)."""
        ids = []
        for t in texts:
            if t not in self.words:
                self.words.append(t)
            ids.append([self.words.index(t)])
        return torch.tensor(ids, dtype=torch.long)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.stack([word_vector(self.words[int(i)]) for i in tokens[:, 0]])

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """[K,3,H,W] -> [K,4]: mean colour of the pixels brighter than near-black."""
        self.image_calls += 1
        out = []
        for view in pixels:
            lit = view.sum(dim=0) > 0.05
            colour = view[:, lit].mean(dim=1) if bool(lit.any()) else torch.zeros(3)
            out.append(torch.cat([colour, torch.tensor([0.0])]))
        return torch.stack(out)


def colour_embed(texts: list[str]) -> torch.Tensor:
    """Stand-in SD text encoder: ``[N,3,4]`` per-token embeddings. Token 0 and 2 are a
    constant start / padding vector, token 1 the colour of the text's last word (so only the
    mean over ALL positions is the colour shifted by a constant)."""
    start = torch.tensor([0.1, 0.1, 0.1, 0.3])
    rows = []
    for t in texts:
        word = t.split()[-1] if t.split() else ""
        rows.append(torch.stack([start, word_vector(word), start]))
    return torch.stack(rows)
