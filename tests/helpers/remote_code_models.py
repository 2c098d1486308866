"""Model folders that ask for remote code, built from the random-weight fixtures, for the tests
that prove no code from a model folder ever runs (unit tests and the real server's /prompt).

Each folder is a working fixture model (open_clip or BLIP) plus some of these:

* ``code``: ``evil_tokenizer.py``, which writes ``sentinel`` when it is imported;
* ``auto_map``: a ``tokenizer_config.json`` whose ``auto_map`` points ``AutoTokenizer`` at
  that module (the way transformers loads a custom tokenizer with ``trust_remote_code``);
* ``kwargs`` (open_clip only): ``open_clip_config.json`` names an HF tokenizer
  (``hf_tokenizer_name``) with ``tokenizer_kwargs: {"trust_remote_code": true}``, so open_clip
  itself would import the module (``open_clip.get_tokenizer("local-dir:...")``);
* ``downloaded``: the ``.freeseg-download.json`` marker a finished download leaves.
"""

from __future__ import annotations

import json
import os
import shutil

MODULE = "evil_tokenizer.py"
DOWNLOAD_MARKER = ".freeseg-download.json"  # freeseg.model_files.DOWNLOAD_MARKER
ATTACKS = ("code", "auto_map", "kwargs")


def evil_module(sentinel: str) -> str:
    """Python source that writes `sentinel` when imported."""
    return (f"with open({sentinel!r}, 'w') as f:\n"
            "    f.write('code from a model folder ran')\n\n\n"
            "class EvilTokenizer:\n"
            "    pass\n")


def build(fixture_dir: str, folder: str, sentinel: str, attacks: tuple[str, ...] = ATTACKS,
          downloaded_from: str | None = None) -> str:
    """Copy fixture model `fixture_dir` to `folder` and add `attacks` (see the module
    docstring); `downloaded_from`: a repository id written into a download marker. Returns
    `folder`."""
    shutil.copytree(fixture_dir, folder)
    if "code" in attacks:
        with open(os.path.join(folder, MODULE), "w", encoding="utf-8") as f:
            f.write(evil_module(sentinel))
    if "auto_map" in attacks:
        path = os.path.join(folder, "tokenizer_config.json")
        config = {}
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        config["auto_map"] = {"AutoTokenizer": ["evil_tokenizer.EvilTokenizer", None]}
        with open(path, "w", encoding="utf-8") as f:
            json.dump(config, f)
    if "kwargs" in attacks:
        path = os.path.join(folder, "open_clip_config.json")
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        config["model_cfg"]["text_cfg"].update(hf_tokenizer_name="evil/tokenizer",
                                               tokenizer_kwargs={"trust_remote_code": True})
        with open(path, "w", encoding="utf-8") as f:
            json.dump(config, f)
    if downloaded_from:
        with open(os.path.join(folder, DOWNLOAD_MARKER), "w", encoding="utf-8") as f:
            json.dump({"repo_id": downloaded_from, "complete": True}, f)
    return folder
