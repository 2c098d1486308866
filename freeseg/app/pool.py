"""Several ComfyUI servers used as one: a bounded number of prompts in flight per server, and
a request whose server fails retried on another one.

    pool = ServerPool(["http://gpu0:8188", "http://gpu1:8188"], per_server=2)
    pool.connect()                                   # /object_info of each; unreachable ones dropped
    result = pool.run(lambda client, info: job.run(client, info, "photo.png"))

`run` is thread-safe and blocks until a slot is free: call it from up to `pool.capacity`
threads at once. Each slot has its own `ComfyClient` (its own websocket client id), so one
server never holds more than `per_server` of this pool's prompts.

Failures (`run`):

* the server cannot be reached or the connection breaks (`ComfyConnectionError`): the server is
  marked down (not used again by this pool) and the request goes to another server;
* the server fails the prompt otherwise (a node error, a timeout): the request goes to another
  server that has not tried it yet; the failing server stays in use;
* the server refuses the prompt (``node_errors``: the workflow or an input is wrong) and any
  other exception: raised at once, no retry (every server would refuse it alike).

When no live server is left that has not tried the request, the error of the one server that
tried it is raised as it is (the real reason), or `NoServerLeft` with every server's error when
several tried it (or none is left).
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, TextIO, TypeVar

from .client import ComfyClient, ComfyConnectionError, ComfyError, one_line

T = TypeVar("T")


class NoServerLeft(ComfyError):
    """No live server is left to try a request on (the message lists each server's error)."""


@dataclass
class Server:
    """One server of a pool: its URL, its /object_info, its free slots (clients)."""

    url: str
    info: dict = field(default_factory=dict)
    free: list[ComfyClient] = field(default_factory=list)
    alive: bool = True
    prompts: int = 0  # requests this server completed for the pool


class ServerPool:
    """Servers by URL, `per_server` requests in flight on each (see the module docstring).

    Args:
        urls: the servers' base URLs (duplicates are dropped).
        per_server: prompts in flight per server (>= 1).
        timeout: seconds for each plain HTTP request.
        stream: where warnings (a server dropped) go (default stderr).
    """

    def __init__(self, urls: Sequence[str], per_server: int = 2, timeout: float = 30.0,
                 stream: Optional[TextIO] = None):
        if per_server < 1:
            raise ValueError(f"per_server must be >= 1, got {per_server}")
        unique = list(dict.fromkeys(u.rstrip("/") for u in urls))
        if not unique:
            raise ValueError("a ServerPool needs at least one server URL")
        self.per_server = per_server
        self.stream = stream if stream is not None else sys.stderr
        self.servers = [Server(u, free=[ComfyClient(u, timeout=timeout) for _ in range(per_server)])
                        for u in unique]
        self._cond = threading.Condition()

    # -- state ------------------------------------------------------------------------------
    @property
    def live(self) -> list[Server]:
        """The servers still in use."""
        with self._cond:
            return [s for s in self.servers if s.alive]

    @property
    def capacity(self) -> int:
        """Requests that can be in flight at once (live servers x per_server)."""
        return len(self.live) * self.per_server

    def warn(self, text: str) -> None:
        print(f"warning: {one_line(text)}", file=self.stream, flush=True)

    def mark_down(self, server: Server, why: str) -> None:
        """Stop using `server` (its queued requests go elsewhere)."""
        with self._cond:
            if server.alive:
                server.alive = False
                left = sum(s.alive for s in self.servers)
                self.warn(f"{why} ({left} server(s) left)")
            self._cond.notify_all()

    def connect(self) -> None:
        """Fetch each server's /object_info; unreachable servers are dropped with a warning.
        NoServerLeft when none answers."""
        failed: list[tuple[Server, ComfyError]] = []
        for server in self.servers:
            try:
                server.info = server.free[0].object_info()
            except ComfyError as e:
                failed.append((server, e))
        with self._cond:
            for server, _ in failed:
                server.alive = False
        if len(failed) == len(self.servers):
            if len(failed) == 1:
                raise failed[0][1]
            raise NoServerLeft("no ComfyUI server answered: "
                               + "; ".join(f"{s.url}: {one_line(str(e))}" for s, e in failed))
        for server, e in failed:
            self.warn(f"dropping {server.url}: {e}")

    # -- requests ---------------------------------------------------------------------------
    def _acquire(self, tried: set[str], errors: list[tuple[str, ComfyError]]) -> tuple[Server, ComfyClient]:
        with self._cond:
            while True:
                candidates = [s for s in self.servers if s.alive and s.url not in tried]
                if len(errors) == 1 and not candidates:
                    raise errors[0][1]
                if not candidates:
                    tried_on = "; ".join(f"{url}: {one_line(str(e))}" for url, e in errors)
                    raise NoServerLeft("no ComfyUI server left to try: " + (tried_on or "all are down"))
                ready = [s for s in candidates if s.free]
                if ready:
                    server = max(ready, key=lambda s: len(s.free))  # the least busy one
                    return server, server.free.pop()
                self._cond.wait()

    def _release(self, server: Server, client: ComfyClient, done: bool) -> None:
        with self._cond:
            server.free.append(client)
            server.prompts += int(done)
            self._cond.notify_all()

    def run(self, request: Callable[[ComfyClient, dict], T]) -> T:
        """`request(client, object_info)` on a free slot of a live server; retried on other
        servers as the module docstring says. Returns what `request` returns."""
        tried: set[str] = set()
        errors: list[tuple[str, ComfyError]] = []  # (server URL, its error)
        while True:
            server, client = self._acquire(tried, errors)
            done = False
            try:
                result = request(client, server.info)
                done = True
                return result
            except ComfyConnectionError as e:
                errors.append((server.url, e))
                tried.add(server.url)
                self.mark_down(server, f"{server.url} failed: {e}")
            except ComfyError as e:
                if "node_errors" in e.details:
                    raise
                errors.append((server.url, e))
                tried.add(server.url)
            finally:
                self._release(server, client, done)
