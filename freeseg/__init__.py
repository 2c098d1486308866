"""FreeSeg-Diff as a plain Python library (no ComfyUI imports).

Stages: caption -> class names (`extract_nouns`), diffusion features -> clusters
(`cluster_features`, `labels_to_masks`), CLIP names per mask (`score_masks`, `assign_open`,
`assign_paper`), refinement (`refine_masks`). Every knob: `freeseg.settings.FreeSegSettings`;
every stage for a batch, in order: `freeseg.pipeline.segment_batch`; the feature-source seam:
`freeseg.capture`.
"""
