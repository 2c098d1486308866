"""Evaluation: datasets (Pascal VOC / COCO-Object layouts), metrics and `python -m freeseg eval`."""
