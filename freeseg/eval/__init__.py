"""Evaluation: score segmentations on Pascal VOC 2012 / COCO-Object (``python -m freeseg eval``).

One concern per module, each over the ones before it:

    datasets.py  dataset layouts, samples, label PNGs (read / write / colours)
    metrics.py   confusion matrices, dataset-level and per-image mIoU (numpy only)
    labels.py    mask names -> dataset classes (synonyms), named masks -> label map
    sources.py   where label maps come from: a folder, or a Segmenter run here
    result.py    EvalResult, the scores of one run
    reports.py   console table and the files of ``--out`` (md, csv, json, charts)
    evaluate.py  ``evaluate``: scores a source on a split, with the resume cache
    cli.py       the ``freeseg eval`` command line
"""
