"""FreeSegNameMasks: masks another node drew from FreeSeg's boxes (core SAM3 Detect), named
back with the boxes' labels, as FreeSeg segments with every output Refine Masks has."""

from __future__ import annotations

from ..freeseg.boxes import name_masks, to_bboxes
from .common import CATEGORY, Segments, io, to_rgb
from .refine_masks import BBOXES_OUTPUT, OUTPUTS, BoundingBoxes, outputs


class FreeSegNameMasks(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FreeSegNameMasks",
            display_name="FreeSeg-Diff Name Masks",
            category=CATEGORY,
            description="Gives masks drawn one per box (core SAM3 Detect with bboxes from Refine Masks, "
                        "individual_masks on, no conditioning) the labels and scores of their boxes, and outputs "
                        "them as FreeSeg segments with masks, labels, SEGS, a preview, JSON and boxes.",
            inputs=[
                io.Mask.Input("masks", tooltip="[N,H,W]: one mask per box, image 0's boxes in order, then "
                              "image 1's, ... (SAM3 Detect's masks with individual_masks on)."),
                BoundingBoxes.Input("bboxes", tooltip="The boxes the masks were drawn from, with their labels "
                                    "(the bboxes output of Refine Masks or Segment Everything).",
                                    extra_dict={"forceInput": True}),  # a socket (0.33 draws boxes as a widget)
                io.Image.Input("image", tooltip="The images the boxes belong to."),
            ],
            outputs=[Segments.Output(display_name="segments"), *OUTPUTS, BBOXES_OUTPUT],
        )

    @classmethod
    def execute(cls, masks, bboxes, image) -> io.NodeOutput:
        pixels = to_rgb(image)
        named = name_masks(masks, bboxes, pixels.shape[0], tuple(pixels.shape[1:3]))
        return io.NodeOutput(named, *outputs(named, image), to_bboxes(named))
