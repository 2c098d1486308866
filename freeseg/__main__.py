"""`python -m freeseg <command> ...`: the command-line entry points.

    segment   segment an image (or a folder / glob of images, on one or several ComfyUI servers):
              masks (PNG), overlay (PNG) and labels (JSON) into a folder
    eval      score segmentations on a dataset (Pascal VOC / COCO-Object layouts): label maps,
              or FreeSeg-Diff run by the diffusers backend or through ComfyUI servers
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "segment": "freeseg.app.segment",
    "eval": "freeseg.eval.cli",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
