"""Class names from an image caption: the first stage of FreeSeg-Diff.

A caption such as "a picture of two dogs playing with a frisbee on the grass" is
turned into the class names it mentions, ``["dog", "frisbee", "grass"]``: singular,
deduplicated, in order of first mention. Names are looked up in a vocabulary
(``DEFAULT_VOCABULARY``, about 1300 visual categories, or one the caller gives), so
articles, counts, colours, verbs and other adjectives fall away because they are not
class names. Multi-word names ("traffic light", "hot dog") win over their last word.

Everything runs offline with the standard library only: plurals are undone by suffix
rules plus small tables of irregular and invariant words ("people" -> "person",
"knives" -> "knife", "bus" and "glasses" stay as they are). Vocabulary entries go
through the same normalisation as the caption, so the two always agree.

Two light heuristics keep modifiers out of the result:

* a noun directly followed by another name is a compound modifier and is dropped
  ("a kitchen sink" -> ``["sink"]``, "a baby elephant" -> ``["elephant"]``) unless it
  is written in the plural ("plates cups" is a list, not a compound) or as a
  possessive ("a man's hand" -> ``["man", "hand"]``);
* a name that doubles as a colour ("orange", "lime", "light") is dropped where it is
  used as one ("an orange and white cat" -> ``["cat"]``).
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, NamedTuple, Optional, Tuple

__all__ = ["DEFAULT_VOCABULARY", "caption_words", "extract_nouns", "load_vocabulary"]

VOCABULARY_PATH = Path(__file__).resolve().parent / "data" / "vocabulary.txt"

# Plurals that the suffix rules below would get wrong.
_IRREGULAR: Dict[str, str] = {
    "people": "person", "persons": "person", "men": "man", "women": "woman",
    "children": "child", "mice": "mouse", "lice": "louse", "geese": "goose",
    "teeth": "tooth", "feet": "foot", "oxen": "ox", "cacti": "cactus",
    "fungi": "fungus", "octopi": "octopus", "antennae": "antenna", "larvae": "larva",
    "knives": "knife", "leaves": "leaf", "shelves": "shelf", "bookshelves": "bookshelf",
    "wolves": "wolf", "calves": "calf", "halves": "half", "loaves": "loaf",
    "scarves": "scarf", "hooves": "hoof", "wives": "wife", "housewives": "housewife",
    "lives": "life", "thieves": "thief", "elves": "elf", "dwarves": "dwarf",
    "sheaves": "sheaf", "wharves": "wharf",
    "busses": "bus", "axes": "axe",
    "quizzes": "quiz", "emus": "emu", "menus": "menu", "gnus": "gnu", "tutus": "tutu",
    "tofus": "tofu", "haikus": "haiku",
}

# Words kept exactly as written: singulars ending in "s", nouns that only exist in
# the plural (a caption's "glasses" is eyewear), and function words.
_INVARIANT = frozenset("""
    bus gas canvas atlas alias christmas brussels lens iris ibis trellis mantis pelvis
    axis oasis tennis chassis debris species series news rhinoceros thermos chaos
    cosmos asbestos kudos texas sports dice fries
    glasses sunglasses eyeglasses goggles binoculars scissors pliers tongs tweezers
    pants jeans trousers shorts sweatpants leggings tights pajamas pyjamas overalls
    clothes headphones earphones stairs
    is as us was has his its this yes does goes towards whereas perhaps always
    sometimes besides upstairs downstairs
""".split())

# Singulars ending in "ie", "oe", "che", "use" and "men" that the suffix rules respect.
_IE_NOUNS = frozenset("""
    pie tie lie die cookie movie brownie hoodie beanie smoothie goalie collie magpie
    zombie selfie veggie rookie pixie birdie hippie bookie calorie prairie genie
    auntie nightie onesie sharpie cutie sweetie boogie bootie freebie techie
""".split())
_OE_NOUNS = frozenset("""
    shoe horseshoe snowshoe toe tiptoe mistletoe canoe hoe oboe floe foe roe woe aloe
""".split())
_CHE_NOUNS = frozenset("""
    mustache moustache niche quiche avalanche cache cliche headache creche douche
    microfiche attache psyche
""".split())
_USE_NOUNS = frozenset("use cause fuse excuse muse abuse ruse recluse".split())
_MEN_NOUNS = frozenset("""
    abdomen specimen ramen omen stamen semen hymen amen regimen lumen albumen bitumen
    acumen dolmen
""".split())

# Extra spellings tried for the last word of a name: "wine glasses" is "wine glass".
_ALTERNATES: Dict[str, Tuple[str, ...]] = {"glasses": ("glass",)}

_COLOUR_WORDS = frozenset("""
    red orange yellow green blue purple pink brown black white gray grey silver gold
    golden beige tan navy teal turquoise maroon cyan magenta violet colored coloured
    colorful colourful striped spotted light dark bright pale deep
""".split())

# Vocabulary names that are also colour words.
_COLOUR_NOUNS = frozenset("""
    orange lime lemon peach cherry plum olive salmon chocolate mustard rose light
    coral gold silver cream wine sand honey
""".split())

# Common caption adjectives (besides the colour words): the official code maps every
# adjective to its head noun, so "a large brown dog" gives the words dog, dog, dog.
_ADJECTIVES = _COLOUR_WORDS | frozenset("""
    big small large little tiny huge giant tall short long wide narrow thick thin fat
    young old new ancient modern wooden metal metallic plastic glass stone brick leather
    furry fluffy hairy shiny wet dry dirty clean empty full open closed busy crowded
    beautiful pretty cute ugly happy sad smiling angry sleepy cozy fancy plain
    sunny cloudy snowy rainy foggy grassy sandy rocky dusty muddy
    wild domestic stuffed fresh ripe raw cooked fried baked frozen hot cold warm
    round square flat curved broken rusty vintage antique electric
""".split())

_RUN_JOINERS = frozenset(("and", ","))  # "a big, brown and white dog"
_ADJECTIVE_RUN = _ADJECTIVES | _RUN_JOINERS

_INTENSITY_WORDS = frozenset(("light", "dark", "bright", "pale", "deep"))
_CONJUNCTIONS = frozenset(("and", "or"))

_TOKEN_RE = re.compile(r"[^\W_]+(?:['-][^\W_]+)*'?|[.,;:!?()\[\]{}\"/|&+]")
_BOUNDARY_CHARS = frozenset(".,;:!?()[]{}\"/|&+")
_PREFIX_RE = re.compile(
    r"^\s*(?:(?:a|an|the|this is an?|there is an?|here is an?)\s+)?"
    r"(?:(?:black and white|close up|close-up|closeup|blurry|old|vintage|color|colour)\s+)*"
    r"(?:picture|photo|photograph|image|snapshot|pic)\s+(?:of|showing)\s+"
)


class _Token(NamedTuple):
    norm: str             # lowercase singular form
    plural: bool          # True when the caption wrote it in the plural
    boundary: bool        # punctuation: no name spans it
    possessive: bool = False  # "man's", "dogs'"


# -- singular forms ---------------------------------------------------------------

@lru_cache(maxsize=8192)
def singular(word: str) -> str:
    """Singular form of one lowercase word: "dogs" -> "dog", "benches" -> "bench",
    "strawberries" -> "strawberry", "policemen" -> "policeman", "bus" -> "bus"."""
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if word in _INVARIANT or len(word) < 3 or not word.isalpha():
        return word
    if word.endswith("ses") and word[:-2] in _INVARIANT:  # lenses, gases, irises
        return word[:-2]
    if word.endswith("men"):
        return word if word in _MEN_NOUNS else word[:-3] + "man"
    if not word.endswith("s") or word.endswith(("ss", "us")):
        return word
    if word.endswith("ies"):
        stem = word[:-3]
        return stem + "ie" if stem + "ie" in _IE_NOUNS else stem + "y"
    if word.endswith("oes"):  # potatoes, flamingoes; but shoes, canoes, horseshoes
        return word[:-1] if word[:-1] in _OE_NOUNS else word[:-2]
    if word.endswith("ches"):
        return word[:-1] if word[:-1] in _CHE_NOUNS else word[:-2]
    if word.endswith(("sses", "shes", "xes", "zzes")):
        return word[:-2]
    if word.endswith("uses") and not word.endswith("ouses"):
        return word[:-1] if word[:-1] in _USE_NOUNS else word[:-2]
    return word[:-1]


# -- tokens -----------------------------------------------------------------------

def _clean(text: str) -> str:
    text = text.lower().replace("\u2019", "'").replace("\u2018", "'").replace("_", " ")
    return _PREFIX_RE.sub("", text, count=1)


def _tokens(text: str) -> List[_Token]:
    """Lowercase singular word tokens; hyphenated words split, possessives stripped."""
    tokens: List[_Token] = []
    for word in _TOKEN_RE.findall(_clean(text)):
        if word in _BOUNDARY_CHARS:
            tokens.append(_Token(word, False, True))
            continue
        possessive = word.endswith("'")
        if word.endswith("'s"):
            word, possessive = word[:-2], True
        word = word.rstrip("'")
        for part in word.split("-"):
            if part:
                norm = singular(part)
                tokens.append(_Token(norm, norm != part, False))
        if possessive and tokens and not tokens[-1].boundary:
            tokens[-1] = tokens[-1]._replace(possessive=True)
    return tokens


# -- vocabulary ---------------------------------------------------------------------

def load_vocabulary(path: Path | str = VOCABULARY_PATH) -> Tuple[str, ...]:
    """Read a vocabulary file: one name per line, ``#`` starts a comment."""
    names: List[str] = []
    seen = set()
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            name = " ".join(line.split("#", 1)[0].split()).lower()
            if name and name not in seen:
                seen.add(name)
                names.append(name)
    return tuple(names)


DEFAULT_VOCABULARY: Tuple[str, ...] = load_vocabulary()


def _normalise_name(name: str) -> Tuple[str, Tuple[str, ...]]:
    """(display name, match key) of a vocabulary entry: "Traffic Lights" ->
    ("traffic light", ("traffic", "light")); "T-Shirts" -> ("t-shirt", ("t", "shirt"))."""
    words = []
    key: List[str] = []
    for word in _TOKEN_RE.findall(name.lower().replace("_", " ")):
        if word in _BOUNDARY_CHARS:
            continue
        parts = [singular(part) for part in word.rstrip("'").split("-") if part]
        words.append("-".join(parts))
        key.extend(parts)
    return " ".join(words), tuple(key)


@lru_cache(maxsize=16)
def _index(vocabulary: Tuple[str, ...]) -> Tuple[Dict[Tuple[str, ...], str], int]:
    """Match key -> display name (first entry wins), and the longest key length.

    A multi-word name ending in an ambiguous plural ("wine glasses") is also found
    from its singular ("wine glass")."""
    index: Dict[Tuple[str, ...], str] = {}
    for entry in vocabulary:
        display, key = _normalise_name(entry)
        if not key:
            continue
        index.setdefault(key, display)
        if len(key) > 1:
            for alternate in _ALTERNATES.get(key[-1], ()):
                index.setdefault(key[:-1] + (alternate,), display)
    return index, max((len(key) for key in index), default=0)


def _as_vocabulary(vocabulary: Iterable[str]) -> Tuple[str, ...]:
    if isinstance(vocabulary, (str, bytes)):
        raise TypeError("vocabulary must be an iterable of class names, not a single string")
    try:
        entries = tuple(vocabulary)
    except TypeError:
        raise TypeError(
            f"vocabulary must be an iterable of str, got {type(vocabulary).__name__}") from None
    for entry in entries:
        if not isinstance(entry, str):
            raise TypeError(f"vocabulary entries must be str, got {type(entry).__name__}: {entry!r}")
    return entries


# -- matching -----------------------------------------------------------------------

def _keys(window: List[_Token]) -> Iterator[Tuple[str, ...]]:
    base = tuple(token.norm for token in window)
    yield base
    for alternate in _ALTERNATES.get(base[-1], ()):
        yield base[:-1] + (alternate,)


def _matches(tokens: List[_Token], index: Dict[Tuple[str, ...], str],
             longest: int) -> List[Tuple[int, int, str]]:
    """Greedy longest-first matches as (start, end, name), left to right."""
    found: List[Tuple[int, int, str]] = []
    i = 0
    while i < len(tokens):
        hit = None
        if not tokens[i].boundary:
            for length in range(min(longest, len(tokens) - i), 0, -1):
                window = tokens[i:i + length]
                if any(token.boundary for token in window):
                    continue
                name = next((index[key] for key in _keys(window) if key in index), None)
                if name is not None:
                    hit = (i, i + length, name)
                    break
        if hit is None:
            i += 1
        else:
            found.append(hit)
            i = hit[1]
    return found


def _norm_at(tokens: List[_Token], i: int) -> str:
    return tokens[i].norm if 0 <= i < len(tokens) else ""


def _used_as_colour(tokens: List[_Token], start: int, end: int) -> bool:
    """True for "orange and white", "orange-brown", "light blue", "white and orange"."""
    after = _norm_at(tokens, end)
    if after in _COLOUR_WORDS:
        return True
    if after in _CONJUNCTIONS and _norm_at(tokens, end + 1) in _COLOUR_WORDS:
        return True
    before = _norm_at(tokens, start - 1)
    if before in _INTENSITY_WORDS:
        return True
    return before in _CONJUNCTIONS and _norm_at(tokens, start - 2) in _COLOUR_WORDS


def extract_nouns(caption: str, vocabulary: Optional[Iterable[str]] = None) -> List[str]:
    """Class names mentioned in ``caption``, singular, in order of first mention.

    Args:
        caption: an image caption, e.g. "a picture of a man and a woman on a bench".
        vocabulary: class names to look for; None uses ``DEFAULT_VOCABULARY``. A given
            vocabulary replaces the default (pass ``DEFAULT_VOCABULARY + ("my thing",)``
            to extend it). Entries are lowercased and singularised like the caption, so
            "Dogs" matches "dog" and is returned as "dog".

    Returns:
        The matched names, deduplicated, e.g. ``["man", "woman", "bench"]``; ``[]`` for an
        empty caption or when nothing matches.

    Raises:
        TypeError: ``caption`` is not a str, or ``vocabulary`` is not an iterable of str.
    """
    if not isinstance(caption, str):
        raise TypeError(f"extract_nouns() expects caption to be a str, got {type(caption).__name__}")
    entries = DEFAULT_VOCABULARY if vocabulary is None else _as_vocabulary(vocabulary)
    index, longest = _index(entries)
    tokens = _tokens(caption)
    found = _matches(tokens, index, longest) if index else []

    names: List[str] = []
    for k, (start, end, name) in enumerate(found):
        last = tokens[end - 1]
        if not (last.plural or last.possessive):
            if k + 1 < len(found) and found[k + 1][0] == end:
                continue  # modifier of a compound: "kitchen sink", "baby elephant"
            if end - start == 1 and name in _COLOUR_NOUNS and _used_as_colour(tokens, start, end):
                continue
        if name not in names:
            names.append(name)
    return names


def caption_words(caption: str, vocabulary: Optional[Iterable[str]] = None) -> List[str]:
    """The caption's words as the official code feeds them to candidate-class inference.

    The official code keeps every non-stop NOUN and ADJ token (spaCy), an adjective standing
    for its head noun. Here the nouns are ``extract_nouns(caption, vocabulary)`` and an
    adjective is a word of a fixed list (colours, sizes, materials, ...) in the run of
    adjectives (joined by "and" or commas) right before a name: each one adds that name
    again, so "a large brown dog on the grass" -> ``["dog", "grass", "dog", "dog"]``.
    Repeats are kept on purpose: they weigh in the official mean-distance threshold.

    Returns ``[]`` for an empty caption or when no name matches.
    """
    nouns = extract_nouns(caption, vocabulary)
    if not nouns:
        return []
    entries = DEFAULT_VOCABULARY if vocabulary is None else _as_vocabulary(vocabulary)
    index, longest = _index(entries)
    tokens = _tokens(caption)
    words = list(nouns)
    for start, _end, name in _matches(tokens, index, longest):
        if name not in nouns:
            continue  # a compound modifier or a colour use, not a noun of the caption
        i = start - 1
        while i >= 0 and tokens[i].norm in _ADJECTIVE_RUN:
            if tokens[i].norm in _ADJECTIVES:
                words.append(name)
            i -= 1
    return words
