"""Synthetic inputs for the tests, the benchmarks and ``freeseg segment --random-weights``:
tiny random-weight models in the real on-disk formats (``models``), the cache that builds them
once (``cache``) and synthetic pictures and feature scenes with known ground truth (``scenes``).

It lives outside ``freeseg/`` because the model builders import ComfyUI (inside their
functions, to write and check ComfyUI-format files), which the library never does, and outside
``tests/`` so that product and bench code need nothing from the tests. ComfyUI never imports
it: the node pack's ``__init__.py`` loads ``nodes/`` only. Importing this package imports
nothing else."""
