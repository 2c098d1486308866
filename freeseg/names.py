"""The one parser of name lists: "comma- or newline-separated names, one line per image or one
line for all", as the nodes' text inputs, the CLI's ``--class-names`` and the library's
``class_names`` arguments give them.

Public API:
    parse_names(text) -> list[str]               names of one list (commas and newlines split)
    names_per_image(text, batch, what) -> B lists one line per image, or one line for all
    lines_per_image(text, batch, what) -> B strs  the same rule for whole lines (captions)
    merge_names(first, extra) -> list[str]       first, then the new names of extra
    caption_class_names(caption, user_names)     a caption's nouns, then the new user names
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence, Union

from .nouns import extract_nouns

__all__ = ["parse_names", "names_per_image", "lines_per_image", "merge_names", "caption_class_names"]


def parse_names(text: Union[str, Iterable[str], None]) -> list[str]:
    """Comma- or newline-separated names (or an iterable of such texts) -> stripped list (inner
    whitespace collapsed), deduplicated case-insensitively, order kept. None -> []."""
    if text is None:
        return []
    items = [text] if isinstance(text, str) else [str(item) for item in text]
    out: list[str] = []
    seen: set[str] = set()
    for item in items:
        for part in item.replace("\n", ",").split(","):
            name = " ".join(part.split())
            if name and name.lower() not in seen:
                seen.add(name.lower())
                out.append(name)
    return out


def lines_per_image(text: Union[str, Sequence[str], None], batch: int, what: str = "text") -> list[str]:
    """One line per image: a list of ``batch`` strings as given, or a text with one
    (non-empty) line per image, or a single line (or none: "") for all of them. ValueError
    naming ``what`` when the line count fits neither."""
    if text is not None and not isinstance(text, str):
        if len(text) != batch:
            raise ValueError(f"{what}: {len(text)} lines for {batch} images")
        return [str(t) for t in text]
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if len(lines) <= 1:
        return [lines[0] if lines else ""] * batch
    if len(lines) != batch:
        raise ValueError(f"{what} has {len(lines)} lines but the batch has {batch} images: give one line per "
                         "image, or a single line for all of them")
    return lines


def names_per_image(text: Union[str, None], batch: int, what: str = "class_names") -> list[list[str]]:
    """A names text (one line per image, names comma-separated; a single line applies to every
    image) -> ``batch`` lists (``parse_names`` of each line)."""
    return [parse_names(line) for line in lines_per_image(text, batch, what)]


def merge_names(first: Sequence[str], extra: Sequence[str]) -> list[str]:
    """``first`` followed by the names of ``extra`` not already in it (case-insensitive)."""
    out = list(first)
    seen = {n.lower() for n in out}
    for name in extra:
        if name.lower() not in seen:
            seen.add(name.lower())
            out.append(name)
    return out


def caption_class_names(caption: str, user_names: Sequence[str] = (),
                        vocabulary: Optional[Iterable[str]] = None) -> list[str]:
    """One image's class names from its caption: the caption's nouns
    (``freeseg.nouns.extract_nouns``) first, then ``user_names`` not already there
    (case-insensitive). The one rule for every caption, BLIP's (``freeseg.stages.caption_images``)
    or any other captioner's text (the Caption node's ``captions`` input)."""
    return merge_names(extract_nouns(caption, vocabulary), list(user_names))
