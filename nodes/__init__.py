"""ComfyUI nodes of the FreeSeg-Diff pack (V3 schema). Thin wrappers over `freeseg`."""

from .caption import FreeSegCaption
from .capture_features import FreeSegCaptureFeatures, FreeSegCapturedFeatures
from .clip_label import FreeSegCLIPLabel
from .cluster_masks import FreeSegClusterMasks
from .diffusion_features import FreeSegDiffusionFeatures
from .loaders import FreeSegBLIP2Loader, FreeSegCLIPLoader, register_download_check, register_folders
from .name_masks import FreeSegNameMasks
from .pipeline import FreeSegPipeline
from .refine_masks import FreeSegRefineMasks
from .save_segments import FreeSegSaveSegments
from .select_mask import FreeSegSelectMask

NODES = [
    FreeSegBLIP2Loader, FreeSegCLIPLoader, FreeSegCaption, FreeSegDiffusionFeatures, FreeSegCaptureFeatures,
    FreeSegCapturedFeatures, FreeSegClusterMasks,
    FreeSegCLIPLabel, FreeSegRefineMasks, FreeSegSelectMask, FreeSegPipeline, FreeSegSaveSegments,
    FreeSegNameMasks,
]

__all__ = ["NODES", "register_download_check", "register_folders"]
