"""FreeSegCLIPLabel: names each mask with CLIP, by the paper's assignment rule."""

from __future__ import annotations

from comfy_api.latest import io

from ..freeseg.clip_label import CROP_MODES, PROMPTS
from ..freeseg.stages import label_segments, label_segments_shared
from ..freeseg.segments import Segments as SegmentsData
from .common import CATEGORY, ClipModel, Progress, Segments, class_lists_for_batch, load_to_device, log, to_rgb

def label(segments: SegmentsData, images, clip, class_names: str, crop_mode: str = "masked",
          prompt: str = "bare", threshold: float = 0.0) -> SegmentsData:
    """Names every mask of every image from that image's class list (None = background)."""
    if not isinstance(segments, SegmentsData):
        raise TypeError("segments: expected FreeSeg-Diff segments (from Cluster Masks)")
    if segments.shared:  # clustered as one batch (Cluster Masks' shared_batch): one name per segment
        return label_segments_shared(segments, to_rgb(images), lambda: load_to_device(clip["patcher"]),
                                     clip["preprocess"], clip["tokenizer"],
                                     class_lists_for_batch(class_names, segments.batch_size), crop_mode, prompt,
                                     threshold, progress=Progress(segments.batch_size))
    return label_segments(segments, to_rgb(images), lambda: load_to_device(clip["patcher"]), clip["preprocess"],
                          clip["tokenizer"], class_lists_for_batch(class_names, segments.batch_size), crop_mode,
                          prompt, threshold, progress=Progress(segments.batch_size), warn=log.warning)


class FreeSegCLIPLabel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FreeSegCLIPLabel",
            display_name="FreeSeg-Diff CLIP Label",
            category=CATEGORY,
            description="Scores every mask against the image's class names with CLIP (all masks of an image "
                        "in one batch); each name goes to its best mask, each mask takes its best remaining "
                        "name, and masks left over are background.",
            inputs=[
                Segments.Input("segments", tooltip="Output of FreeSeg-Diff Cluster Masks."),
                io.Image.Input("image", tooltip="The same images the segments came from."),
                ClipModel.Input("clip_model", tooltip="An open_clip model from FreeSeg-Diff CLIP Loader."),
                io.String.Input("class_names", default="", multiline=True, tooltip="Class names: one line per "
                                "image, or one line for all, comma-separated (e.g. from FreeSeg-Diff Caption)."),
                io.Combo.Input("crop_mode", options=list(CROP_MODES), default="masked", tooltip="masked: whole "
                               "image with everything outside the mask zeroed (paper). bbox: crop to the mask's box."),
                io.Combo.Input("prompt", options=list(PROMPTS), default="bare", tooltip="bare: the names alone "
                               "(paper). ensemble: averaged 'a photo of a ...' style templates."),
                io.Float.Input("threshold", default=0.0, min=0.0, max=1.0, step=0.01, tooltip="A mask whose "
                               "best CLIP probability is below this stays background."),
            ],
            outputs=[Segments.Output(display_name="segments")],
        )

    @classmethod
    def execute(cls, segments, image, clip_model, class_names, crop_mode, prompt, threshold) -> io.NodeOutput:
        return io.NodeOutput(label(segments, image, clip_model, class_names, crop_mode, prompt, threshold))
