"""FreeSegCaption: a caption per image (BLIP-2) and the class names it mentions."""

from __future__ import annotations

from ..freeseg.stages import caption_images
from .common import CATEGORY, Captioner, Progress, io, load_to_device, parse_names, to_rgb


def caption(images, captioner=None, class_names: str = "", max_new_tokens: int = 30) -> tuple[list[str], list[list[str]]]:
    """B captions and B class lists (caption nouns first, then the user's names)."""
    pixels = to_rgb(images)
    if captioner is None:
        return caption_images(pixels, None, None, parse_names(class_names))
    return caption_images(pixels, lambda: load_to_device(captioner["patcher"]), captioner["processor"],
                          parse_names(class_names), max_new_tokens=max_new_tokens, progress=Progress(pixels.shape[0]))


class FreeSegCaption(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FreeSegCaption",
            display_name="FreeSeg-Diff Caption",
            category=CATEGORY,
            description="Captions each image with BLIP-2 and lists the class names the caption mentions, "
                        "plus your own names. Without a captioner, your names alone.",
            inputs=[
                io.Image.Input("image", tooltip="Images to caption."),
                io.String.Input("class_names", default="", multiline=False, tooltip="Extra class names, "
                                "comma-separated, added to every image's list (e.g. 'dog, frisbee')."),
                io.Int.Input("max_new_tokens", default=30, min=1, max=200, tooltip="Longest caption, in tokens."),
                Captioner.Input("blip2", optional=True, tooltip="A captioner from FreeSeg-Diff BLIP-2 Loader."),
            ],
            outputs=[io.String.Output(display_name="captions", tooltip="One caption per line, per image."),
                     io.String.Output(display_name="class_names", tooltip="One line per image: its class "
                                      "names, comma-separated.")],
        )

    @classmethod
    def execute(cls, image, class_names, max_new_tokens, blip2=None) -> io.NodeOutput:
        captions, lists = caption(image, blip2, class_names, max_new_tokens)
        return io.NodeOutput("\n".join(captions), "\n".join(", ".join(names) for names in lists))
