"""Unit tests for freeseg.nouns (extract_nouns, DEFAULT_VOCABULARY)."""
from __future__ import annotations

import pytest

from freeseg import nouns
from freeseg.nouns import DEFAULT_VOCABULARY, extract_nouns, load_vocabulary

# Realistic BLIP / BLIP-2 style captions and the exact names expected from the
# default vocabulary.
CAPTIONS = [
    # plurals, counts and verbs dropped, "a picture of" prefix dropped
    ("a picture of two dogs playing with a frisbee on the grass", ["dog", "frisbee", "grass"]),
    ("a man and a woman", ["man", "woman"]),
    # multi-word names win over their last word; colours dropped
    ("a red double decker bus driving down a street", ["double decker bus", "street"]),
    ("arafed man sitting on a bench next to a fire hydrant", ["man", "bench", "fire hydrant"]),
    ("a traffic light on a pole next to a building", ["traffic light", "pole", "building"]),
    ("a teddy bear sitting on a chair", ["teddy bear", "chair"]),
    ("a hot dog with ketchup and mustard on a bun", ["hot dog", "ketchup", "mustard", "bun"]),
    ("a man's hand holding a cell phone", ["man", "hand", "cell phone"]),
    ("a living room with a couch, a coffee table and a tv",
     ["living room", "couch", "coffee table", "tv"]),
    ("a man holding a tennis racket on a tennis court", ["man", "tennis racket", "tennis court"]),
    ("two wine glasses and a bottle of wine on a dining table",
     ["wine glass", "bottle", "wine", "dining table"]),
    # "glasses" on its own is eyewear, not "glass"
    ("a man wearing glasses and a tie", ["man", "glasses", "tie"]),
    # irregular plurals
    ("a group of people standing around a table with laptops", ["person", "table", "laptop"]),
    ("children playing soccer in a park", ["child", "park"]),
    ("mice eating cheese on a kitchen counter", ["mouse", "cheese", "counter"]),
    ("a flock of geese flying over a lake", ["goose", "lake"]),
    ("a giraffe eating leaves from a tree", ["giraffe", "leaf", "tree"]),
    ("the boxes are stacked on the shelves", ["box", "shelf"]),
    ("several buses parked in a parking lot", ["bus", "parking lot"]),
    ("a young boy brushing his teeth with a toothbrush", ["boy", "tooth", "toothbrush"]),
    ("a couple of men on surfboards riding waves", ["man", "surfboard", "wave"]),
    # dedup, order of first mention
    ("a bus stop with people waiting for the bus", ["bus stop", "person", "bus"]),
    ("a dog chasing a cat and another dog on the beach", ["dog", "cat", "beach"]),
    # colour words that are also class names
    ("an orange and white cat laying on a bed", ["cat", "bed"]),
    ("a plate with an orange and a banana", ["plate", "orange", "banana"]),
    ("a bowl of fruit with apples, bananas and oranges",
     ["bowl", "fruit", "apple", "banana", "orange"]),
    ("a woman with light brown hair wearing sunglasses", ["woman", "hair", "sunglasses"]),
    # compound modifiers dropped, "an image of" / "a black and white photo of" dropped
    ("a baby elephant standing next to its mother", ["elephant", "mother"]),
    ("there is a cat that is sitting on a laptop keyboard", ["cat", "keyboard"]),
    ("an image of a bird perched on a tree branch", ["bird", "branch"]),
    ("a black and white photo of a man riding a horse", ["man", "horse"]),
    ("a close up of a pizza with mushrooms and peppers", ["pizza", "mushroom", "pepper"]),
    # hyphenated names and COCO's plural "skis"
    ("a woman in a t-shirt holding an umbrella in the rain", ["woman", "t-shirt", "umbrella", "rain"]),
    ("a person riding skis down a mountain", ["person", "ski", "mountain"]),
    ("a woman wearing jeans and a hat", ["woman", "jeans", "hat"]),
    # capitals and punctuation
    ("A Polar Bear swimming in the water.", ["polar bear", "water"]),
]


@pytest.mark.parametrize("caption, expected", CAPTIONS)
def test_captions(caption: str, expected: list) -> None:
    assert extract_nouns(caption) == expected


def test_irregular_plurals_are_singularised() -> None:
    caption = ("people men women children mice geese teeth feet knives leaves shelves "
               "buses boxes wolves oxen cacti")
    assert extract_nouns(caption) == [
        "person", "man", "woman", "child", "mouse", "goose", "tooth", "foot", "knife",
        "leaf", "shelf", "bus", "box", "wolf", "ox", "cactus"]


def test_singular_words_ending_in_s_are_not_mangled() -> None:
    caption = "a bus, grass, a dress, a glass, a cactus, an octopus, a walrus, asparagus, a tennis ball"
    assert extract_nouns(caption) == [
        "bus", "grass", "dress", "glass", "cactus", "octopus", "walrus", "asparagus", "tennis ball"]


def test_plural_only_nouns_stay_plural() -> None:
    caption = "a man in pants and shorts holding scissors next to some clothes and goggles"
    assert extract_nouns(caption) == ["man", "pants", "shorts", "scissors", "clothes", "goggles"]


def test_possessives() -> None:
    assert extract_nouns("the women's shoes and the dogs' bowls") == ["woman", "shoe", "dog", "bowl"]
    assert extract_nouns("a man\u2019s face") == ["man", "face"]
    assert extract_nouns("a cat's tail") == ["cat", "tail"]


def test_empty_and_unmatched_captions() -> None:
    assert extract_nouns("") == []
    assert extract_nouns("   \n ") == []
    assert extract_nouns("a picture of") == []
    assert extract_nouns("two big bright red and shiny") == []


def test_custom_vocabulary_restricts() -> None:
    caption = "a man walking a dog on the beach next to a surfboard"
    assert extract_nouns(caption, ["dog", "surfboard"]) == ["dog", "surfboard"]
    assert extract_nouns(caption, ["cat"]) == []
    assert extract_nouns(caption, []) == []


def test_custom_vocabulary_extends() -> None:
    caption = "a clown riding a unicycle"
    assert extract_nouns(caption) == ["clown"]
    assert extract_nouns(caption, DEFAULT_VOCABULARY + ("unicycle",)) == ["clown", "unicycle"]


def test_custom_vocabulary_is_normalised() -> None:
    vocabulary = ["Dogs", "Traffic Lights", "  Fire   Hydrants ", "KNIVES", "Wine_Bottles"]
    caption = "a dog next to two traffic lights, a fire hydrant, a knife and a wine bottle"
    assert extract_nouns(caption, vocabulary) == [
        "dog", "traffic light", "fire hydrant", "knife", "wine bottle"]
    # "glasses" stays plural (eyewear), but a "wine glasses" entry still finds "a wine glass"
    assert extract_nouns("a wine glass and a man in glasses", ["Wine Glasses", "glasses"]) == [
        "wine glasses", "glasses"]
    # a generator works too, and duplicates after normalisation are harmless
    assert extract_nouns("dogs and cats", (name for name in ["dog", "Dogs", "CAT"])) == ["dog", "cat"]


def test_picture_prefix_dropped_even_when_picture_is_a_class() -> None:
    vocabulary = ["picture", "photo", "dog", "wall"]
    assert extract_nouns("a picture of a dog", vocabulary) == ["dog"]
    assert extract_nouns("a black and white photo of a dog", vocabulary) == ["dog"]
    assert extract_nouns("a dog looking at a picture on the wall", vocabulary) == [
        "dog", "picture", "wall"]


@pytest.mark.parametrize("caption", [None, 42, b"a dog", ["a dog"]])
def test_non_string_caption_raises(caption: object) -> None:
    with pytest.raises(TypeError, match="caption to be a str"):
        extract_nouns(caption)  # type: ignore[arg-type]


def test_bad_vocabulary_raises() -> None:
    with pytest.raises(TypeError, match="not a single string"):
        extract_nouns("a dog", "dog")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="entries must be str"):
        extract_nouns("a dog", ["dog", 3])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="iterable of str"):
        extract_nouns("a dog", 5)  # type: ignore[arg-type]


COCO_NAMES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "ski", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
]
VOC_NAMES = ["airplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
             "dining table", "dog", "horse", "motorcycle", "person", "potted plant", "sheep",
             "sofa", "train", "monitor"]


def test_default_vocabulary_contents() -> None:
    assert isinstance(DEFAULT_VOCABULARY, tuple)
    assert 800 <= len(DEFAULT_VOCABULARY) <= 1500
    assert len(set(DEFAULT_VOCABULARY)) == len(DEFAULT_VOCABULARY)
    assert len(COCO_NAMES) == 80
    missing = [name for name in COCO_NAMES + VOC_NAMES if name not in DEFAULT_VOCABULARY]
    assert missing == []
    for name in ("sky", "grass", "road", "water", "sea", "river", "tree", "building", "wall",
                 "floor", "ceiling", "mountain", "sand", "snow", "field", "rock", "fence",
                 "bridge", "window", "door", "man", "woman", "child", "hand", "face", "hair"):
        assert name in DEFAULT_VOCABULARY
    for generic in ("picture", "photo", "image", "view", "side", "front", "top", "background",
                    "middle", "group", "lot", "way", "time", "day", "couple"):
        assert generic not in DEFAULT_VOCABULARY


def test_default_vocabulary_is_normalised() -> None:
    for name in DEFAULT_VOCABULARY:
        assert name.isascii() and name == name.lower().strip(), name
        assert nouns._normalise_name(name)[0] == name, name


def test_load_vocabulary_reads_comments_and_blank_lines(tmp_path) -> None:
    path = tmp_path / "vocab.txt"
    path.write_text("# header\n\nDog   # a pet\n  fire   hydrant\ndog\n", encoding="utf-8")
    assert load_vocabulary(path) == ("dog", "fire hydrant")


@pytest.mark.parametrize("plural, singular", [
    ("dogs", "dog"), ("benches", "bench"), ("dishes", "dish"), ("foxes", "fox"),
    ("dresses", "dress"), ("strawberries", "strawberry"), ("cookies", "cookie"),
    ("ties", "tie"), ("monkeys", "monkey"), ("potatoes", "potato"), ("shoes", "shoe"),
    ("canoes", "canoe"), ("pianos", "piano"), ("giraffes", "giraffe"), ("gloves", "glove"),
    ("knives", "knife"), ("wolves", "wolf"), ("houses", "house"), ("horses", "horse"),
    ("octopuses", "octopus"), ("lenses", "lens"), ("mustaches", "mustache"),
    ("policemen", "policeman"), ("ramen", "ramen"), ("kiwis", "kiwi"), ("tvs", "tv"),
    ("sheep", "sheep"), ("grass", "grass"), ("tennis", "tennis"), ("cactus", "cactus"),
])
def test_singular_rules(plural: str, singular: str) -> None:
    assert nouns.singular(plural) == singular
    # the same word in a one-entry vocabulary is found from either form
    assert extract_nouns(f"two {plural} and one {singular}", [singular]) == [singular]
    assert extract_nouns(f"a {singular}", [plural]) == [singular]


def test_module_is_standalone_and_light() -> None:
    """nouns.py loads on its own (no package __init__), imports nothing heavy or networked."""
    import subprocess
    import sys
    code = (
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('nouns_alone', sys.argv[1])\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        "assert mod.extract_nouns('two dogs on a couch') == ['dog', 'couch']\n"
        "print([m for m in ('torch', 'nltk', 'spacy', 'inflect', 'requests', 'urllib.request',"
        " 'comfy', 'folder_paths') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code, nouns.__file__],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
