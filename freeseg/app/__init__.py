"""The applications around the library: `python -m freeseg segment`, the HTTP client for a
ComfyUI server, the server launcher and the output-folder writer."""
