"""FreeSegPipeline: every stage in one box with the paper's settings; naming by the
open-vocabulary rule (default) or the paper's closed-vocabulary protocol."""

from __future__ import annotations

from ..freeseg.stages import DEFAULTS, PAPER, RULES
from .caption import caption
from .cluster_masks import cluster
from .clip_label import label
from .common import CATEGORY, Captioner, ClipModel, Segments, check_choice, first_problem, io, parse_names
from .diffusion_features import extract
from .refine_masks import OUTPUTS, outputs, refine


class FreeSegPipeline(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FreeSegPipeline",
            display_name="FreeSeg-Diff Segment Everything",
            category=CATEGORY,
            description="Caption, diffusion features, clustering, CLIP names and CRF refinement in one node, "
                        "with the paper's settings (512 px, timestep 0, cross-attention queries, k-means, "
                        "bare names, masked crops, CRF). rule open (default): your names and the caption's "
                        "must beat background words; rule paper: the paper's protocol over a full class list.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL from your checkpoint loader (SD1.x, SD2.x or SDXL)."),
                io.Vae.Input("vae", tooltip="The VAE that belongs to the model."),
                io.Image.Input("image", tooltip="Images to segment."),
                ClipModel.Input("clip_model", tooltip="An open_clip model from FreeSeg-Diff CLIP Loader."),
                io.String.Input("class_names", default="", tooltip="open rule: extra class names, comma-separated, "
                                "added to what the caption mentions (the only names when no captioner is given). "
                                "paper rule: the full class list (e.g. the 20 Pascal VOC classes)."),
                io.Int.Input("n_clusters", default=4, min=1, max=64, tooltip="Masks per image (paper: 4)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seed of noise and k-means."),
                io.Combo.Input("rule", options=list(RULES), default="open", optional=True,
                               tooltip="open: names must beat background words. paper: the paper's closed-"
                               "vocabulary protocol (candidates from the caption through the checkpoint's CLIP; "
                               "needs blip2 and clip)."),
                Captioner.Input("blip2", optional=True, tooltip="A captioner from FreeSeg-Diff BLIP Loader "
                                "(the paper's: BLIP base COCO)."),
                io.Clip.Input("clip", optional=True, tooltip="The checkpoint's text encoder, for the "
                              "empty-prompt conditioning (and the paper rule's candidate classes)."),
            ],
            outputs=[Segments.Output(display_name="segments"), *OUTPUTS,
                     io.String.Output(display_name="captions", tooltip="One caption per line, per image.")],
        )

    @classmethod
    def validate_inputs(cls, rule=None) -> bool | str:
        return first_problem(check_choice("rule", rule, RULES))

    @classmethod
    def execute(cls, model, vae, image, clip_model, class_names, n_clusters, seed, rule="open", blip2=None,
                clip=None) -> io.NodeOutput:
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        if rule == "paper" and (blip2 is None or clip is None):
            raise ValueError("rule paper: connect blip2 (the captioner) and clip (the checkpoint's text encoder); "
                             "the candidate classes come from the caption")
        if rule == "paper" and not parse_names(class_names):
            raise ValueError("class_names: rule paper needs the full class list (e.g. the 20 Pascal VOC classes)")
        p = PAPER if rule == "paper" else DEFAULTS
        captions, lists = caption(image, blip2, "" if rule == "paper" else class_names, p.max_new_tokens,
                                  p.caption_prompt, p.min_new_tokens)
        features = extract(model, vae, image, clip, p.timestep, p.resolution, p.source, seed)
        segments = cluster(features, n_clusters, p.cluster_method, seed)
        segments = label(segments, image, clip_model, "\n".join(", ".join(n) for n in lists), p.crop_mode,
                         p.prompt, p.threshold, rule, ", ".join(p.background), class_names, captions,
                         clip)
        segments = refine(segments, image, p.refine)
        return io.NodeOutput(segments, *outputs(segments, image), "\n".join(captions))
