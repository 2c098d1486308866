"""What the command line shows: the progress bar of a running prompt, errors for a terminal
user, file names as printable text, and the check of the output folder option."""

from __future__ import annotations

import os
import sys
from typing import Optional, TextIO

from .client import ComfyError, format_node_errors, one_line


def shown(text: str) -> str:
    """`text` as printable UTF-8: the bytes of a file name that are not UTF-8 (which Python
    holds as surrogate escapes) written ``\\xNN``."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def report_error(err: ComfyError, prompt: Optional[dict] = None, stream: Optional[TextIO] = None) -> None:
    """Print a ComfyError for a command-line user: a rejected prompt's node errors one per line,
    anything else on one line."""
    stream = stream if stream is not None else sys.stderr
    if "node_errors" in err.details:
        for line in format_node_errors(err.details, prompt if prompt is not None else err.prompt):
            print(f"error: {line}" if not line.startswith("  ") else line, file=stream)
    else:
        print(f"error: {one_line(str(err))}", file=stream)


def out_folder_error(out: str) -> Optional[str]:
    """Why `out` cannot be the output folder (it, or a folder above it, is an existing file),
    or None."""
    path = os.path.abspath(out)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        what = "is" if path == os.path.abspath(out) else f"is inside {shown(path)}, which is"
        return f"--out {shown(out)} {what} an existing file, not a folder"
    return None


class ProgressBar:
    """A plain text progress bar on stderr, fed with ComfyClient.run's websocket events.

    On a terminal it redraws one line; otherwise it writes a line per node started."""

    def __init__(self, prompt: dict, stream: Optional[TextIO] = None, width: int = 30):
        self.prompt = prompt
        self.total = max(len(prompt), 1)
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.done: set[str] = set()
        self.current: Optional[str] = None
        self.step = (0, 0)
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.shown = False
        self.last = ""

    def __call__(self, kind: str, data: dict) -> None:
        if kind == "execution_cached":
            self.done.update(str(n) for n in data.get("nodes") or [])
        elif kind == "executing":
            if self.current is not None:
                self.done.add(self.current)
            node = data.get("node")
            self.current = None if node is None else str(node)
            self.step = (0, 0)
            if node is None:
                self.done.update(self.prompt)
        elif kind == "progress":
            self.step = (int(data.get("value") or 0), int(data.get("max") or 0))
            if not self.tty:
                return
        elif kind == "execution_success":
            self.done.update(self.prompt)
            self.current = None
        else:
            return
        self.draw()

    def fraction(self) -> float:
        """How much of the prompt has run (0..1)."""
        part = self.step[0] / self.step[1] if self.step[1] else 0.0
        current = part if self.current is not None and self.current not in self.done else 0.0
        return min(1.0, (len(self.done & set(self.prompt)) + current) / self.total)

    def draw(self) -> None:
        frac = self.fraction()
        filled = int(round(frac * self.width))
        bar = "#" * filled + "-" * (self.width - filled)
        what = ""
        if self.current is not None:
            node = self.prompt.get(self.current, {})
            what = node.get("_meta", {}).get("title") or node.get("class_type", self.current)
            if self.step[1]:
                what += f" {self.step[0]}/{self.step[1]}"
        line = f"[{bar}] {frac * 100:3.0f}% {what}".rstrip()
        if self.tty:
            self.stream.write("\r" + line.ljust(100)[:100])
        elif line != self.last:
            self.stream.write(line + "\n")
        self.last = line
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        """End the bar's line (call once the run is over, or failed)."""
        if self.shown and self.tty:
            self.stream.write("\n")
            self.stream.flush()
        self.shown = False
