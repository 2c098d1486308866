"""FreeSegPipeline: every stage in one box with the paper's settings; naming by the
open-vocabulary rule (default) or the paper's closed-vocabulary protocol. It calls the
orchestrator ``freeseg.pipeline.segment_batch`` with the ComfyUI runtime parts."""

from __future__ import annotations

from ..freeseg.boxes import to_bboxes
from ..freeseg.names import parse_names
from ..freeseg.pipeline import Captioner as CaptionerParts
from ..freeseg.pipeline import Models, segment_batch
from ..freeseg.settings import CHOICES, DEFAULTS, PAPER
from ..freeseg.vocab import cached_embed
from .clip_label import clip_parts, text_embed
from .common import CATEGORY, Captioner, ClipModel, Progress, Segments, check_choice, first_problem, input_range, \
    io, load_to_device, log, on_compute_device
from .diffusion_features import ComfyFeatures, dit_family
from .refine_masks import BBOXES_OUTPUT, OUTPUTS, outputs


class FreeSegPipeline(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FreeSegPipeline",
            display_name="FreeSeg-Diff Segment Everything",
            category=CATEGORY,
            description="Caption, diffusion features, clustering, CLIP names and CRF refinement in one node, "
                        "with the paper's settings (512 px, timestep 0, cross-attention queries, k-means, "
                        "bare names, masked crops, CRF; rule open checks the CRF with a guided filter). "
                        "rule open (default): your names and the caption's "
                        "must beat background words; rule paper: the paper's protocol over a full class list.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL from your checkpoint loader (SD1.x, SD2.x, SDXL; Flux and SD3 "
                               "at their family's timestep and resolution, README \"DiT checkpoints\")."),
                io.Vae.Input("vae", tooltip="The VAE that belongs to the model."),
                io.Image.Input("image", tooltip="Images to segment."),
                ClipModel.Input("clip_model", tooltip="An open_clip model from FreeSeg-Diff CLIP Loader."),
                io.String.Input("class_names", default="", tooltip="open rule: extra class names, comma-separated, "
                                "added to what the caption mentions (the only names when no captioner is given). "
                                "paper rule: the full class list (e.g. the 20 Pascal VOC classes)."),
                io.Int.Input("n_clusters", default=DEFAULTS.n_clusters, min=1, max=input_range("n_clusters")["max"],
                             tooltip="Masks per image (paper: 4)."),
                io.Int.Input("seed", default=DEFAULTS.seed, **input_range("seed"), tooltip="Seed of noise and k-means."),
                io.Combo.Input("rule", options=list(CHOICES["rule"]), default=DEFAULTS.rule, optional=True,
                               tooltip="open: names must beat background words. paper: the paper's closed-"
                               "vocabulary protocol (candidates from the caption through the checkpoint's CLIP; "
                               "needs blip2 and clip)."),
                Captioner.Input("blip2", optional=True, tooltip="A captioner from FreeSeg-Diff BLIP Loader "
                                "(the paper's: BLIP base COCO)."),
                io.Clip.Input("clip", optional=True, tooltip="The checkpoint's text encoder, for the "
                              "empty-prompt conditioning (and the paper rule's candidate classes)."),
            ],
            outputs=[Segments.Output(display_name="segments"), *OUTPUTS,
                     io.String.Output(display_name="captions", tooltip="One caption per line, per image."),
                     BBOXES_OUTPUT],
        )

    @classmethod
    def validate_inputs(cls, rule=None) -> bool | str:
        return first_problem(check_choice("rule", rule, CHOICES["rule"]))

    @classmethod
    def execute(cls, model, vae, image, clip_model, class_names, n_clusters, seed, rule="open", blip2=None,
                clip=None) -> io.NodeOutput:
        if rule == "paper" and (blip2 is None or clip is None):
            raise ValueError("rule paper: connect blip2 (the captioner) and clip (the checkpoint's text encoder); "
                             "the candidate classes come from the caption")
        preset = PAPER if rule == "paper" else DEFAULTS.replace(rule=rule)
        settings = preset.replace(n_clusters=n_clusters, seed=seed)
        family = dit_family(model)
        if family is not None:  # a DiT: its family's timestep and resolution (freeseg.dit.FAMILIES)
            settings = settings.replace(timestep=family.timestep, resolution=family.resolution)
        models = Models(
            features=ComfyFeatures(model, vae, clip),
            clip=clip_parts(clip_model),
            captioner=CaptionerParts(lambda: load_to_device(blip2["patcher"]), blip2["processor"])
            if blip2 is not None else None,
            text_embed=cached_embed(text_embed(clip)) if clip is not None else None,
            progress=Progress, warn=log.warning)
        with on_compute_device() as device:  # clusters and refinement on ComfyUI's GPU when there is one
            models.device = device
            result = segment_batch(image, settings, models, parse_names(class_names))
        return io.NodeOutput(result.segments, *outputs(result.segments, image), "\n".join(result.captions),
                             to_bboxes(result.segments))
