"""FreeSeg-Diff without ComfyUI, on ``diffusers``: ``loading`` (``load_sd`` -> ``SDModels``) and
``pipeline`` (``FreeSegPipeline``: the feature source and ``segment`` through
``freeseg.pipeline.segment_batch``). See ``freeseg.backends.diffusers.pipeline`` for a quick start."""

from .loading import DEFAULT_SD_CONFIG, SDModels, load_sd
from .pipeline import FreeSegPipeline, FreeSegResult, load_image

__all__ = ["FreeSegPipeline", "FreeSegResult", "SDModels", "DEFAULT_SD_CONFIG", "load_sd", "load_image"]
