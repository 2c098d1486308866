"""The applications around the library: `python -m freeseg segment` (one image, or a folder on
one or several ComfyUI servers: batch.py, pool.py, remote.py), the HTTP client for a ComfyUI
server, the server launcher, the output-folder writer and the evaluator's ComfyUI Segmenter
(comfy_segmenter.py)."""
