"""FreeSegClusterMasks: k-means (or agglomerative) clustering of the diffusion features into
class-agnostic masks at the image's own resolution; the count per image fixed (paper), chosen
automatically, or taken from the class list, and optionally one clustering for the batch."""

from __future__ import annotations

import torch

from ..freeseg.cluster import METHODS, adaptive_n_clusters
from ..freeseg.features import DiffusionFeatures
from ..freeseg.stages import cluster_segments, merge_names
from ..freeseg.segments import Segments as SegmentsData
from .common import CATEGORY, Features, Progress, Segments, check_choice, class_lists_for_batch, first_problem, io

K_FROM = ("n_clusters", "class_names")
MAX_K = 64


def check_inputs(n_clusters: int, method: str, max_clusters: int, k_from: str, class_offset: int) -> None:
    """ValueError naming the first bad input (ComfyUI 0.3.75 does not check V3 combos or ranges)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    if k_from not in K_FROM:
        raise ValueError(f"k_from must be one of {list(K_FROM)}, got {k_from!r}")
    for name, value, low, high in (("n_clusters", n_clusters, 0, MAX_K), ("max_clusters", max_clusters, 2, MAX_K),
                                   ("class_offset", class_offset, -16, 16)):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"{name} must be an int in {low}..{high}, got {value!r}")


def cluster(features: DiffusionFeatures, n_clusters: int, method: str = "kmeans", seed: int = 0,
            max_clusters: int = 8, k_from: str = "n_clusters", class_offset: int = 1, class_names: str = "",
            shared: bool = False) -> SegmentsData:
    """Cluster each image's feature grid into masks `[B,K,H,W]` at the image size.

    k_from "n_clusters": K = n_clusters (0 = automatic, 2..max_clusters). "class_names": K = the
    number of the image's class names + class_offset (with `shared`, of all images' names)."""
    if not isinstance(features, DiffusionFeatures):
        raise TypeError("features: expected the output of FreeSeg-Diff Diffusion Features")
    check_inputs(n_clusters, method, max_clusters, k_from, class_offset)
    if not isinstance(shared, bool):
        raise ValueError(f"shared_batch must be true or false, got {shared!r}")
    b, _, h, w = features.features.shape
    counts = n_clusters
    if k_from == "class_names":
        lists = class_lists_for_batch(class_names or "", b)
        limit = min(MAX_K, h * w)
        if shared:
            merged: list[str] = []
            for names in lists:
                merged = merge_names(merged, names)
            counts = adaptive_n_clusters(len(merged), class_offset, limit)
        else:
            counts = [adaptive_n_clusters(len(names), class_offset, limit) for names in lists]
    return cluster_segments(features, counts, method, seed, progress=Progress(b), max_clusters=max_clusters,
                            shared=shared)


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
                io.Int.Input("n_clusters", default=4, min=0, max=MAX_K, tooltip="Masks per image (paper: 4). "
                             "0 = automatic: every count from 2 to max_clusters is tried and the one whose "
                             "clusters are best separated (silhouette score) is kept; costs about "
                             "max_clusters - 1 clusterings."),
                io.Combo.Input("method", options=list(METHODS), default="kmeans", tooltip="kmeans with "
                               "k-means++ start (paper) or agglomerative (Ward)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seed of the k-means start."),
                io.Int.Input("max_clusters", optional=True, default=8, min=2, max=MAX_K, tooltip="Largest count tried when "
                             "n_clusters is 0."),
                io.Combo.Input("k_from", optional=True, options=list(K_FROM), default="n_clusters", tooltip="n_clusters: the "
                               "count above (paper). class_names: the number of the image's class names + "
                               "class_offset (the official code's adaptive mode; connect class_names, e.g. "
                               "from FreeSeg-Diff Caption)."),
                io.Int.Input("class_offset", optional=True, default=1, min=-16, max=16, tooltip="With k_from class_names: "
                             "masks beyond the number of names (1 = one for the background)."),
                io.Boolean.Input("shared_batch", optional=True, default=False, tooltip="Cluster all images of the batch "
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
        return first_problem(check_choice("method", method, METHODS), check_choice("k_from", k_from, K_FROM))

    @classmethod
    def execute(cls, features, n_clusters, method, seed, max_clusters=8, k_from="n_clusters", class_offset=1,
                shared_batch=False, class_names="") -> io.NodeOutput:
        segments = cluster(features, n_clusters, method, seed, max_clusters, k_from, class_offset, class_names,
                           shared_batch)
        return io.NodeOutput(segments, label_map(segments))
