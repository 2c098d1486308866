"""FreeSegClusterMasks: k-means (or agglomerative) clustering of the diffusion features into
class-agnostic masks at the image's own resolution; the count per image fixed (paper), chosen
automatically, or taken from the class list, and optionally one clustering for the batch."""

from __future__ import annotations

from typing import Optional

import torch

import comfy.model_management as mm

from ..freeseg.features import DiffusionFeatures
from ..freeseg.names import names_per_image
from ..freeseg.segments import Segments as SegmentsData
from ..freeseg.settings import CHOICES, DEFAULTS
from ..freeseg.stages import cluster_batch
from .common import CATEGORY, Features, Progress, Segments, check_choice, first_problem, input_range, io, \
    on_compute_device


def cluster(features: DiffusionFeatures, n_clusters: int, method: str = "kmeans", seed: int = 0,
            max_clusters: int = 8, k_from: str = "n_clusters", class_offset: int = 1, class_names: str = "",
            shared: bool = False, device: Optional[torch.device] = None) -> SegmentsData:
    """Cluster each image's feature grid into masks `[B,K,H,W]` at the image size
    (``freeseg.stages.cluster_batch``; the inputs checked as ``FreeSegSettings`` fields).

    k_from "n_clusters": K = n_clusters (0 = automatic, 2..max_clusters). "class_names": K = the
    number of the image's class names + class_offset (with `shared`, of all images' names).
    `device`: where the clustering runs (None: the features' device); the masks come back on
    the CPU."""
    if not isinstance(features, DiffusionFeatures):
        raise TypeError("features: expected the output of FreeSeg-Diff Diffusion Features")
    settings = DEFAULTS.replace(n_clusters=n_clusters, cluster_method=method, seed=seed, max_clusters=max_clusters,
                                k_from=k_from, class_offset=class_offset, shared_batch=shared)
    b = features.features.shape[0]
    lists = names_per_image(class_names, b) if k_from == "class_names" else None
    return cluster_batch(features, settings, lists, progress=Progress(b), device=device)


def label_map(segments: SegmentsData) -> torch.Tensor:
    """`[B,H,W]` float: each pixel's mask index scaled to 0..1 (a greyscale preview)."""
    k = segments.masks.shape[1]
    return segments.masks.argmax(dim=1).float() / max(k - 1, 1)


class FreeSegClusterMasks(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FreeSegClusterMasks",
            display_name="FreeSeg-Diff Cluster Masks",
            category=CATEGORY,
            description="Clusters the diffusion features of each image into class-agnostic masks.",
            inputs=[
                Features.Input("features", tooltip="Output of FreeSeg-Diff Diffusion Features."),
                io.Int.Input("n_clusters", default=DEFAULTS.n_clusters, **input_range("n_clusters"), tooltip="Masks per image (paper: 4). "
                             "0 = automatic: the features are cut into 2 x max_clusters clusters, then clusters "
                             "that only split a region, hold the blended features of a boundary, or cover under "
                             "2% of the image are merged away; costs about one clustering."),
                io.Combo.Input("method", options=list(CHOICES["cluster_method"]), default=DEFAULTS.cluster_method, tooltip="kmeans with "
                               "k-means++ start (paper) or agglomerative (Ward)."),
                io.Int.Input("seed", default=DEFAULTS.seed, **input_range("seed"), tooltip="Seed of the k-means start."),
                io.Int.Input("max_clusters", optional=True, default=DEFAULTS.max_clusters, **input_range("max_clusters"),
                             tooltip="Largest count tried when "
                             "n_clusters is 0."),
                io.Combo.Input("k_from", optional=True, options=list(CHOICES["k_from"]), default=DEFAULTS.k_from, tooltip="n_clusters: the "
                               "count above (paper). class_names: the number of the image's class names + "
                               "class_offset (the official code's adaptive mode; connect class_names, e.g. "
                               "from FreeSeg-Diff Caption)."),
                io.Int.Input("class_offset", optional=True, default=DEFAULTS.class_offset, **input_range("class_offset"),
                             tooltip="With k_from class_names: "
                             "masks beyond the number of names (1 = one for the background)."),
                io.Boolean.Input("shared_batch", optional=True, default=DEFAULTS.shared_batch, tooltip="Cluster all images of the batch "
                                 "together (e.g. the frames of a video): a segment keeps its index, colour "
                                 "and name in every frame. Off: each image on its own (paper)."),
                io.String.Input("class_names", default="", multiline=True, optional=True, tooltip="Class "
                                "names for k_from class_names: one line per image, or one for all, "
                                "comma-separated (FreeSeg-Diff Caption's class_names)."),
            ],
            outputs=[Segments.Output(display_name="segments"),
                     io.Mask.Output(display_name="cluster_map", tooltip="[B,H,W] mask index / (K-1).")],
        )

    @classmethod
    def validate_inputs(cls, method=None, k_from=None) -> bool | str:
        return first_problem(check_choice("method", method, CHOICES["cluster_method"]),
                             check_choice("k_from", k_from, CHOICES["k_from"]))

    @classmethod
    def execute(cls, features, n_clusters, method, seed, max_clusters=8, k_from="n_clusters", class_offset=1,
                shared_batch=False, class_names="") -> io.NodeOutput:
        with on_compute_device() as device:  # ComfyUI's GPU when there is one; else the free CPU cores
            segments = cluster(features, n_clusters, method, seed, max_clusters, k_from, class_offset, class_names,
                               shared_batch, device)
        return io.NodeOutput(segments, label_map(segments).to(mm.intermediate_device()))
