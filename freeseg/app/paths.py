"""Where the project's own files are, computed once.

``REPO`` is the repository root, which is also the ComfyUI node pack (the folder ComfyUI
loads from ``custom_nodes/``): it holds ``freeseg/``, ``nodes/``, ``workflows/``,
``randmodels/`` and the project's ``.venv/``. Product code, bench scripts and tests take it
from here (scripts in ``scripts/`` and ``bench/`` put it on ``sys.path`` with one line first)."""

from __future__ import annotations

import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_WORKFLOW = os.path.join(REPO, "workflows", "api", "freeseg_full.json")


def fixture_cache() -> str:
    """The folder of the random-weight test models: ``$FREESEG_FIXTURE_CACHE`` or
    ``<REPO>/.cache/fixtures``."""
    return os.environ.get("FREESEG_FIXTURE_CACHE") or os.path.join(REPO, ".cache", "fixtures")
