"""The nodes use the pinned V3 API (comfy_api.v0_0_2), imported in one place (nodes/common.py)."""

import ast
import glob
import os

from freeseg.app.paths import REPO


def comfy_api_imports(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    return [node.module for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("comfy_api")] + \
           [a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names
            if a.name.startswith("comfy_api")]


def test_only_nodes_common_imports_comfy_api_and_only_v0_0_2():
    files = [os.path.join(REPO, "__init__.py"), *glob.glob(os.path.join(REPO, "nodes", "*.py")),
             *glob.glob(os.path.join(REPO, "freeseg", "**", "*.py"), recursive=True)]
    found = {os.path.relpath(f, REPO): comfy_api_imports(f) for f in files}
    assert {f: m for f, m in found.items() if m} == {os.path.join("nodes", "common.py"):
                                                     ["comfy_api.v0_0_2"]}
