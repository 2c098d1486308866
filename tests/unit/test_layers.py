"""The floors of the project, read from the import statements: ``nodes/`` stands directly on the
library (nothing from ``freeseg/app``), ``freeseg/`` imports neither ComfyUI nor the synthetic
models (``--random-weights`` builds them in a subprocess), and no product or bench code reaches
into ``tests/``."""

import ast
import glob
import os

from freeseg.app.paths import REPO


def python_files(*folders: str) -> list[str]:
    return sorted(f for folder in folders for f in glob.glob(os.path.join(REPO, folder, "**", "*.py"), recursive=True))


def imported(path: str) -> set[str]:
    """Every module `path` imports, relative imports resolved against its package (inside
    functions too)."""
    rel = os.path.relpath(path, REPO)
    package = os.path.dirname(rel).split(os.sep)
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join([p for p in base if p] + ([node.module] if node.module else []))
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)
    return found


def offenders(files: list[str], banned: tuple[str, ...]) -> dict[str, list[str]]:
    out = {}
    for path in files:
        bad = sorted(m for m in imported(path) if any(m == b or m.startswith(b + ".") for b in banned))
        if bad:
            out[os.path.relpath(path, REPO)] = bad
    return out


def test_nodes_import_nothing_from_the_app_layer():
    assert offenders(python_files("nodes"), ("freeseg.app", "synthetic")) == {}


def test_the_library_imports_neither_comfyui_nor_the_synthetic_models():
    assert offenders(python_files("freeseg"), ("comfy", "comfy_api", "folder_paths", "nodes", "server",
                                               "synthetic")) == {}


def test_product_and_bench_code_need_nothing_from_tests():
    helpers = tuple(os.path.splitext(os.path.basename(f))[0]
                    for f in glob.glob(os.path.join(REPO, "tests", "helpers", "*.py")))
    files = [os.path.join(REPO, "__init__.py"), *python_files("freeseg", "nodes", "bench", "synthetic")]
    assert offenders(files, ("tests", *helpers)) == {}
    for path in files:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        assert "tests/helpers" not in text and '"tests", "helpers"' not in text, path
