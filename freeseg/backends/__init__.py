"""Backends that run the FreeSeg-Diff stages outside ComfyUI (`diffusers`: Stable Diffusion through diffusers)."""
