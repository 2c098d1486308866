"""The Caption node with any captioner: its `captions` STRING input (here from core String
nodes, as from core TextGenerate or Florence-2) and no BLIP loader, on a real ComfyUI server.
The class names must be the ones the BLIP path extracts from the same text
(``freeseg.names.caption_class_names``, what ``freeseg.stages.caption_images`` uses)."""

import pytest

from comfy_harness import MODEL_LINKS, Graph, probed
from freeseg.app.client import ComfyError
from freeseg.names import caption_class_names


def test_caption_string_without_a_captioner_gives_the_blip_path_names(client, upload):
    g = Graph()
    image = g.node("LoadImage", image=upload(64, 48, seed=31))
    text = g.node("PrimitiveStringMultiline", value="A dog and two cats\nsitting on a sofa.")
    caption = g.node("FreeSegCaption", image=image[0], class_names="frisbee, Dog", max_new_tokens=8,
                     captions=text[0])
    captions, names = g.probe(caption[0]), g.probe(caption[1])
    result = client.run(g.prompt)
    # one image: the whole text is its caption, line breaks as spaces
    assert probed(result, captions)["value"] == "A dog and two cats sitting on a sofa."
    expected = caption_class_names("A dog and two cats sitting on a sofa.", ["frisbee", "Dog"])
    assert expected == ["dog", "cat", "sofa", "frisbee"]
    assert probed(result, names)["value"] == ", ".join(expected)


def test_caption_string_one_line_per_image(client, upload):
    g = Graph()
    image = g.node("LoadImage", image=upload(40, 32, seed=32))
    batch = g.node("RepeatImageBatch", image=image[0], amount=2)
    text = g.node("PrimitiveStringMultiline", value="a horse in a field\na bottle and a cup on a table")
    caption = g.node("FreeSegCaption", image=batch[0], class_names="", max_new_tokens=8, captions=text[0])
    names = g.probe(caption[1])
    lines = probed(client.run(g.prompt), names)["value"].split("\n")
    assert lines == [", ".join(caption_class_names("a horse in a field")),
                     ", ".join(caption_class_names("a bottle and a cup on a table"))]
    assert lines[0].startswith("horse") and lines[1].startswith("bottle, cup")


@pytest.mark.parametrize("lines, refused", [("one\ntwo\nthree", "captions"), (None, "blip2 and captions")])
def test_caption_string_refusals_name_the_inputs(client, upload, lines, refused):
    g = Graph()
    image = g.node("LoadImage", image=upload(40, 32, seed=33))
    batch = g.node("RepeatImageBatch", image=image[0], amount=2)
    inputs = {"image": batch[0], "class_names": "dog", "max_new_tokens": 8}
    inputs["captions"] = g.node("PrimitiveStringMultiline", value=lines or "a dog")[0]
    if lines is None:  # both a captioner and a captions text
        inputs["blip2"] = g.node("FreeSegBLIP2Loader", model_name=MODEL_LINKS["blip2_dir"][1], download=False,
                                 repo_id="")[0]
    g.probe(g.node("FreeSegCaption", **inputs)[1])
    with pytest.raises(ComfyError) as err:
        client.run(g.prompt)
    assert refused in str(err.value)


@pytest.mark.parametrize("connect", ["neither", "both"])
def test_caption_refuses_neither_or_both_before_anything_runs(client, upload, connect):
    """Queue-time refusal (validate_inputs): the prompt is rejected, naming both inputs, and
    nothing runs (the probe never executes)."""
    g = Graph()
    image = g.node("LoadImage", image=upload(40, 32, seed=34))
    inputs = {"image": image[0], "class_names": "dog", "max_new_tokens": 8}
    if connect == "both":
        inputs["captions"] = g.node("PrimitiveStringMultiline", value="a dog")[0]
        inputs["blip2"] = g.node("FreeSegBLIP2Loader", model_name=MODEL_LINKS["blip2_dir"][1], download=False,
                                 repo_id="")[0]
    g.probe(g.node("FreeSegCaption", **inputs)[1])
    with pytest.raises(ComfyError) as err:
        client.queue(g.prompt, strict=True)
    message = str(err.value)
    assert "blip2" in message and "captions" in message and "FreeSegCaption" in message, message
    assert ("neither" if connect == "neither" else "both connected") in message


def test_caption_still_checks_the_types_of_its_links(client, upload):
    """validate_inputs declares input_types (so it sees which inputs are linked), which turns off
    ComfyUI's own type check of the links: the node checks them itself."""
    g = Graph()
    image = g.node("LoadImage", image=upload(40, 32, seed=35))
    number = g.node("PrimitiveInt", value=3)
    g.probe(g.node("FreeSegCaption", image=image[0], class_names="dog", max_new_tokens=8, captions=number[0])[1])
    with pytest.raises(ComfyError) as err:
        client.queue(g.prompt, strict=True)
    assert "captions: a INT output is linked, it takes STRING" in str(err.value)


def test_the_cli_prompt_without_a_captioner_gives_the_typed_names(client, upload):
    """freeseg.app.workflow.drop_captioner (the CLI's prompt when no captioner is used): the
    loader goes, Caption takes an empty captions text and passes the typed names alone."""
    from freeseg.app.workflow import drop_captioner

    g = Graph()
    image = g.node("LoadImage", image=upload(40, 32, seed=36))
    blip = g.node("FreeSegBLIP2Loader", model_name=MODEL_LINKS["blip2_dir"][1], download=False, repo_id="")
    caption = g.node("FreeSegCaption", image=image[0], class_names="dog, Cat", max_new_tokens=8, blip2=blip[0])
    captions, names = g.probe(caption[0]), g.probe(caption[1])
    prompt = drop_captioner(g.prompt)
    assert "FreeSegBLIP2Loader" not in {n["class_type"] for n in prompt.values()}
    result = client.run(prompt)
    assert probed(result, captions)["value"] == ""
    assert probed(result, names)["value"] == ", ".join(caption_class_names("", ["dog", "Cat"]))


def test_captions_given_as_a_value_in_an_api_prompt(client, upload):
    """An API client may put the caption text itself in the prompt instead of a link: it counts
    as connected (not refused as "neither"), and its names are the BLIP path's."""
    g = Graph()
    image = g.node("LoadImage", image=upload(48, 40, seed=35))
    caption = g.node("FreeSegCaption", image=image[0], class_names="", max_new_tokens=8,
                     captions="a cat on a sofa")
    names = g.probe(caption[1])
    result = client.run(g.prompt)
    assert probed(result, names)["value"] == ", ".join(caption_class_names("a cat on a sofa", []))
