"""FreeSegCaption: a caption per image (BLIP or BLIP-2, or any captioner's text) and the class
names it mentions."""

from __future__ import annotations

from typing import Optional

from comfy_execution.validation import validate_node_input

from ..freeseg.caption import MAX_NEW_TOKENS_LIMIT, MAX_PROMPT_CHARS, check_caption_options
from ..freeseg.names import caption_class_names, lines_per_image, parse_names
from ..freeseg.settings import PAPER
from ..freeseg.stages import caption_images
from .common import CATEGORY, Captioner, Progress, io, load_to_device, to_rgb


def caption(images, captioner=None, class_names: str = "", max_new_tokens: int = PAPER.max_new_tokens,
            prompt: Optional[str] = PAPER.caption_prompt,
            min_new_tokens: int = PAPER.min_new_tokens,
            captions: Optional[str] = None) -> tuple[list[str], list[list[str]]]:
    """B captions and B class lists (caption nouns first, then the user's names); the decoding
    options checked as ``FreeSegSettings`` fields. The captions come from ``captioner`` (BLIP /
    BLIP-2), or from ``captions``, another node's text (one line per image or one line for all;
    for one image the whole text, its line breaks as spaces), whose names are extracted by the
    same rule (``freeseg.names.caption_class_names``). ValueError naming both inputs when both
    or neither are given (``FreeSegCaption.validate_inputs`` refuses those prompts at queue time)."""
    pixels = to_rgb(images)
    s = PAPER.replace(max_new_tokens=max_new_tokens, caption_prompt=prompt, min_new_tokens=min_new_tokens)
    user = parse_names(class_names)
    if captions is not None:
        if captioner is not None:
            raise ValueError("blip2 and captions are both connected: connect one of them (blip2 captions the "
                             "images, captions takes another node's text)")
        b = pixels.shape[0]
        texts = [" ".join(captions.split())] if b == 1 else lines_per_image(captions, b, "captions")
        return texts, [caption_class_names(text, user) for text in texts]
    if captioner is None:
        raise ValueError("neither blip2 (a captioner) nor captions (another node's caption text) is connected: "
                         "connect one of them")
    return caption_images(pixels, lambda: load_to_device(captioner["patcher"]), captioner["processor"],
                          user, max_new_tokens=s.max_new_tokens, num_beams=s.num_beams,
                          prompt=s.caption_prompt, min_new_tokens=s.min_new_tokens, progress=Progress(pixels.shape[0]))


class FreeSegCaption(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FreeSegCaption",
            display_name="FreeSeg-Diff Caption",
            category=CATEGORY,
            description="Captions each image with BLIP (the paper's captioner) or BLIP-2, or takes the captions "
                        "of any other captioner (core TextGenerate, Florence-2, ...) as text, and lists the class "
                        "names the caption mentions, plus your own names. Connect one of blip2 and captions "
                        "(for your names alone, use CLIP Label's class_names without this node). "
                        "The defaults are the paper's: prompt 'a picture of ', 3 beams, 6 to 26 new tokens.",
            inputs=[
                io.Image.Input("image", tooltip="Images to caption."),
                io.String.Input("class_names", default="", multiline=False, tooltip="Extra class names, "
                                "comma-separated, added to every image's list (e.g. 'dog, frisbee')."),
                io.Int.Input("max_new_tokens", default=PAPER.max_new_tokens, min=1, max=MAX_NEW_TOKENS_LIMIT,
                             tooltip="Longest caption, in generated tokens (the prompt is not counted). "
                             "Paper: 26 (LAVIS's max_length 30 counts [DEC] and the prompt's 3 tokens)."),
                io.String.Input("prompt", default=PAPER.caption_prompt, multiline=False, optional=True,
                                tooltip="Text the caption starts from, removed from the caption (paper: "
                                f"'a picture of '). Empty: no prompt. One line, at most {MAX_PROMPT_CHARS} "
                                "characters."),
                io.Int.Input("min_new_tokens", default=PAPER.min_new_tokens, min=0, max=MAX_NEW_TOKENS_LIMIT,
                             optional=True, tooltip="Shortest caption, in generated tokens (the prompt is not "
                             "counted; at most max_new_tokens). Paper: 6 (LAVIS's min_length 10)."),
                Captioner.Input("blip2", optional=True, tooltip="A captioner from FreeSeg-Diff BLIP Loader "
                                "(BLIP or BLIP-2). Leave it out when captions is connected."),
                io.String.Input("captions", optional=True, force_input=True, tooltip="Captions from any other "
                                "node (core TextGenerate, Florence-2, ...) instead of blip2: one line per "
                                "image, or one line for all (one image: the whole text). Class names are "
                                "taken from it exactly as from BLIP's captions; the decoding options above "
                                "are not used."),
            ],
            outputs=[io.String.Output(display_name="captions", tooltip="One caption per line, per image."),
                     io.String.Output(display_name="class_names", tooltip="One line per image: its class "
                                      "names, comma-separated.")],
        )

    @classmethod
    def validate_inputs(cls, input_types, max_new_tokens=None, prompt=PAPER.caption_prompt,
                        min_new_tokens=PAPER.min_new_tokens, captions=None) -> bool | str:
        """Queue-time checks: exactly one of `blip2` and `captions` is connected, and the decoding
        options (ComfyUI skips its own range checks of the inputs named here, and with
        `input_types` declared its type check of the links, done here instead); a linked (not
        yet known) value is checked at run time. `prompt` and `min_new_tokens` are optional: an
        API prompt without them gets the paper's values. `captions` given as a value in an API
        prompt (not linked) counts as connected."""
        linked = input_types or {}  # {input name: type of the output linked to it}
        declared = {i.id: i.get_io_type() for i in cls.define_schema().inputs}
        for name, received in linked.items():
            if name in declared and not validate_node_input(received, declared[name]):
                return f"{name}: a {received} output is linked, it takes {declared[name]}"
        if max_new_tokens is not None and min_new_tokens is not None:
            try:
                check_caption_options(prompt, max_new_tokens, min_new_tokens, PAPER.num_beams)
            except ValueError as exc:
                return str(exc)
        has_captions = "captions" in linked or captions is not None
        if "blip2" not in linked and not has_captions:
            return ("neither blip2 (a captioner from FreeSeg-Diff BLIP Loader) nor captions (another node's "
                    "caption text, e.g. core TextGenerate) is connected: connect one of them")
        if "blip2" in linked and has_captions:
            return ("blip2 and captions are both connected: connect one of them (blip2 captions the images, "
                    "captions takes another node's text)")
        return True

    @classmethod
    def execute(cls, image, class_names, max_new_tokens, prompt=PAPER.caption_prompt,
                min_new_tokens=PAPER.min_new_tokens, blip2=None, captions=None) -> io.NodeOutput:
        texts, lists = caption(image, blip2, class_names, max_new_tokens, prompt, min_new_tokens, captions)
        return io.NodeOutput("\n".join(texts), "\n".join(", ".join(names) for names in lists))
