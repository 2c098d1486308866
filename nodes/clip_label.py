"""FreeSegCLIPLabel: names each mask with CLIP, by the open-vocabulary rule (default) or the
paper's closed-vocabulary protocol."""

from __future__ import annotations

import torch

from ..freeseg.names import lines_per_image, names_per_image, parse_names
from ..freeseg.pipeline import naming_inputs
from ..freeseg.segments import Segments as SegmentsData
from ..freeseg.settings import CHOICES, DEFAULTS
from ..freeseg.stages import ClipParts, label_segments
from ..freeseg.vocab import DEFAULT_BACKGROUND, Embed, cached_embed, parse_background
from .common import CATEGORY, ClipModel, Progress, Segments, check_choice, check_number, first_problem, \
    input_range, io, load_to_device, log, to_rgb


def text_embed(clip) -> Embed:
    """``texts -> [N,T,D]`` per-token conditioning of the checkpoint's text encoder (a ComfyUI
    CLIP): ``encode_from_tokens(tokenize(text))`` per text, on the CPU in float32."""
    def embed(texts: list[str]) -> torch.Tensor:
        conds = [clip.encode_from_tokens(clip.tokenize(t)).float().cpu() for t in texts]
        lengths = {c.shape[1] for c in conds}
        if len(lengths) > 1:
            raise ValueError(f"clip: texts encode to different lengths {sorted(lengths)}; use shorter words")
        return torch.cat(conds)
    return embed


def clip_parts(clip_model) -> ClipParts:
    """The CLIP Loader's output as the naming stage's ``ClipParts`` (the model loaded to its
    device right before each use)."""
    return ClipParts(lambda: load_to_device(clip_model["patcher"]), clip_model["preprocess"], clip_model["tokenizer"])


def label(segments: SegmentsData, images, clip_model, class_names: str, crop_mode: str = "masked",
          prompt: str = "bare", threshold: float = 0.0, rule: str = "open", background: str | None = None,
          classes: str = "", captions: str | list[str] = "", clip=None) -> SegmentsData:
    """Names every mask of every image (None = background), by ``freeseg.stages.label_segments``
    with what ``freeseg.pipeline.naming_inputs`` makes of the inputs.

    rule "open": from that image's ``class_names`` plus the ``background`` words (None: the
    default list; "": none). rule "paper": ``classes`` is the full class list; the candidates
    come from ``captions`` through the checkpoint's text encoder ``clip`` (both required)."""
    if not isinstance(segments, SegmentsData):
        raise TypeError("segments: expected FreeSeg-Diff segments (from Cluster Masks)")
    settings = DEFAULTS.replace(crop_mode=crop_mode, prompt=prompt, threshold=threshold, rule=rule,
                                background=parse_background(background))
    b = segments.batch_size
    if rule == "open":
        naming = naming_inputs(settings, names_per_image(class_names, b))
    else:
        embed = cached_embed(text_embed(clip)) if clip is not None else None
        naming = naming_inputs(settings, [parse_names(classes)] * b, lines_per_image(captions, b, "captions"), embed)
        log.info("FreeSeg-Diff CLIP Label (paper): candidates %s", naming.candidates)
    return label_segments(segments, to_rgb(images), clip_parts(clip_model), settings, naming, progress=Progress(b),
                          warn=log.warning)


class FreeSegCLIPLabel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FreeSegCLIPLabel",
            display_name="FreeSeg-Diff CLIP Label",
            category=CATEGORY,
            description="Scores every mask with CLIP (all masks of an image in one batch). open: against the "
                        "class names plus background words; a mask takes its best name only where it beats "
                        "every background word. paper: the paper's protocol over a full class list, limited to "
                        "the classes the caption points to.",
            inputs=[
                Segments.Input("segments", tooltip="Output of FreeSeg-Diff Cluster Masks."),
                io.Image.Input("image", tooltip="The same images the segments came from."),
                ClipModel.Input("clip_model", tooltip="An open_clip model from FreeSeg-Diff CLIP Loader."),
                io.String.Input("class_names", default="", multiline=True, tooltip="open rule: class names, one "
                                "line per image or one line for all, comma-separated (e.g. from FreeSeg-Diff "
                                "Caption). Unused by the paper rule."),
                io.Combo.Input("crop_mode", options=list(CHOICES["crop_mode"]), default=DEFAULTS.crop_mode, tooltip="masked: whole "
                               "image with everything outside the mask zeroed (paper). bbox: crop to the mask's box."),
                io.Combo.Input("prompt", options=list(CHOICES["prompt"]), default=DEFAULTS.prompt, tooltip="bare: the names alone "
                               "(paper). ensemble: averaged 'a photo of a ...' style templates."),
                io.Float.Input("threshold", default=DEFAULTS.threshold, **input_range("threshold"), step=0.01, tooltip="open rule: a mask "
                               "whose winning name's CLIP probability is below this stays background."),
                io.Combo.Input("rule", options=list(CHOICES["rule"]), default=DEFAULTS.rule, optional=True,
                               tooltip="open: names must beat the background words (for your own names). "
                               "paper: the paper's closed-vocabulary protocol (needs classes, captions and clip)."),
                io.String.Input("background", default=", ".join(DEFAULT_BACKGROUND), multiline=False,
                                optional=True, tooltip="open rule: background words, comma-separated. A mask "
                                "whose best word is one of these stays unnamed, unless the word is also in "
                                "class_names."),
                io.String.Input("classes", default="", multiline=True, optional=True,
                                tooltip="paper rule: the full class list, comma-separated (e.g. the 20 Pascal "
                                "VOC classes)."),
                io.String.Input("captions", optional=True, force_input=True, tooltip="paper rule: the captions "
                                "(FreeSeg-Diff Caption's captions output); their words pick the candidate classes."),
                io.Clip.Input("clip", optional=True, tooltip="paper rule: the checkpoint's text encoder (CLIP of "
                              "the checkpoint loader), used to match caption words to classes."),
            ],
            outputs=[Segments.Output(display_name="segments")],
        )

    @classmethod
    def validate_inputs(cls, crop_mode=None, prompt=None, threshold=None, rule=None) -> bool | str:
        # Declaring threshold here makes ComfyUI skip its own min/max check of it (and NaN
        # passes any comparison), so the range is checked here.
        return first_problem(check_choice("crop_mode", crop_mode, CHOICES["crop_mode"]),
                             check_choice("prompt", prompt, CHOICES["prompt"]),
                             check_number("threshold", threshold),
                             check_choice("rule", rule, CHOICES["rule"]))

    @classmethod
    def execute(cls, segments, image, clip_model, class_names, crop_mode, prompt, threshold, rule="open",
                background=None, classes="", captions="", clip=None) -> io.NodeOutput:
        return io.NodeOutput(label(segments, image, clip_model, class_names, crop_mode, prompt, threshold, rule,
                                   background, classes or "", captions or "", clip))
