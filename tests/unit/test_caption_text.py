"""Any captioner (issue 18 item 4): class names from a caption given as text (the Caption node's
`captions` STRING, from core TextGenerate, Florence-2 or any node) are the ones the BLIP path
extracts from the same text: both go through ``freeseg.names.caption_class_names``."""
from __future__ import annotations

import re

import pytest
import torch

from freeseg.caption import load_captioner
from freeseg.names import caption_class_names
from freeseg.stages import caption_images
from synthetic import cache


@pytest.fixture(scope="module")
def blip() -> tuple:
    return load_captioner(cache.build_all_subprocess()["blip_dir"])


def test_blip_captions_and_the_same_text_give_the_same_class_names(blip: tuple) -> None:
    model, processor = blip
    images = torch.rand(2, 32, 40, 3, generator=torch.Generator().manual_seed(3))
    captions, _ = caption_images(images, model, processor, max_new_tokens=8, min_new_tokens=8)
    # The random-weight captioner writes arbitrary word pieces: make its words the vocabulary, so
    # the BLIP path finds names in its own captions (the check below then compares real lists).
    vocabulary = sorted({w for c in captions for w in re.findall(r"[a-z]{3,}", c.lower())})
    assert vocabulary, captions
    user = ["frisbee", "Dog"]
    again, blip_names = caption_images(images, model, processor, user, max_new_tokens=8, min_new_tokens=8,
                                       vocabulary=vocabulary)
    assert again == captions  # beam search: the same captions
    assert any(len(names) > len(user) for names in blip_names)
    assert blip_names == [caption_class_names(text, user, vocabulary) for text in captions]


def test_caption_class_names_nouns_first_then_the_new_user_names() -> None:
    assert caption_class_names("A dog and two cats sitting on a sofa.", ["frisbee", "Dog"]) == \
        ["dog", "cat", "sofa", "frisbee"]
    assert caption_class_names("", ["frisbee"]) == ["frisbee"]
    assert caption_class_names("a picture of nothing much") == []
