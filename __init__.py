"""freeseg-diff: training-free open-vocabulary segmentation (FreeSeg-Diff) for ComfyUI.

ComfyUI loads this file from `custom_nodes/` and calls `comfy_entrypoint`, which registers the
model folders, the loaders' check of prompts (a `download` that is not a JSON boolean is
refused) and the nodes. Importing this file does nothing else, so the package (and the
ComfyUI-free library in `freeseg/`) can be imported without ComfyUI."""


async def comfy_entrypoint():
    from .nodes import NODES, register_download_check, register_folders
    from .nodes.common import ComfyExtension

    register_folders()
    register_download_check()

    class FreeSegExtension(ComfyExtension):
        async def get_node_list(self):
            return list(NODES)

    return FreeSegExtension()
