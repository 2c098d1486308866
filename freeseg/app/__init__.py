"""The applications around the library: `python -m freeseg segment` (segment.py: one image, or
a folder on one ComfyUI server or past one on Ray: batch.py, remote.py, cluster.py), the ComfyUI
transport (client.py), workflow editing (workflow.py), what the command line shows
(console.py), the server launcher (server.py), the output-folder writer (output.py), the
project's paths (paths.py) and the evaluator's ComfyUI Segmenter (comfy_segmenter.py)."""
