"""FreeSegClusterMasks: k-means (or agglomerative) clustering of the diffusion features into
class-agnostic masks at the image's own resolution."""

from __future__ import annotations

import torch

from ..freeseg.cluster import METHODS
from ..freeseg.features import DiffusionFeatures
from ..freeseg.stages import cluster_segments
from ..freeseg.segments import Segments as SegmentsData
from .common import CATEGORY, Features, Progress, Segments, check_choice, first_problem, io

def cluster(features: DiffusionFeatures, n_clusters: int, method: str = "kmeans", seed: int = 0) -> SegmentsData:
    """Cluster each image's feature grid into `n_clusters` masks `[B,K,H,W]` at the image size."""
    if not isinstance(features, DiffusionFeatures):
        raise TypeError("features: expected the output of FreeSeg-Diff Diffusion Features")
    return cluster_segments(features, n_clusters, method, seed, progress=Progress(features.features.shape[0]))


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
                io.Int.Input("n_clusters", default=4, min=1, max=64, tooltip="Masks per image (paper: 4)."),
                io.Combo.Input("method", options=list(METHODS), default="kmeans", tooltip="kmeans with "
                               "k-means++ start (paper) or agglomerative (Ward)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seed of the k-means start."),
            ],
            outputs=[Segments.Output(display_name="segments"),
                     io.Mask.Output(display_name="cluster_map", tooltip="[B,H,W] mask index / (K-1).")],
        )

    @classmethod
    def validate_inputs(cls, method=None) -> bool | str:
        return first_problem(check_choice("method", method, METHODS))

    @classmethod
    def execute(cls, features, n_clusters, method, seed) -> io.NodeOutput:
        segments = cluster(features, n_clusters, method, seed)
        return io.NodeOutput(segments, label_map(segments))
