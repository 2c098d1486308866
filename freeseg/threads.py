"""How many CPU threads torch work should use on a machine other processes share.

torch's CPU kernels split work over its intra-op threads and wait for the slowest one; when
other processes keep some cores busy, a thread that lands on a busy core is descheduled and
the whole kernel waits for it. Measured on a 2-core machine with 2 other busy processes: the
CRF of one 512 px scene took 5.3 s with torch's 2 threads and 0.76 s with 1 thread. So the
rule is to use only the cores the other processes leave free (``cpu_threads``), applied
around a piece of work and restored after (``torch_threads``).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from typing import Iterator, Optional

import torch

__all__ = ["usable_cpus", "others_running", "cpu_threads", "torch_threads"]


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask; ``os.cpu_count()`` where there is none)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not Linux
        return max(os.cpu_count() or 1, 1)


def others_running(samples: int = 5, interval: float = 0.001) -> Optional[int]:
    """Tasks of other processes runnable right now: the running count of ``/proc/loadavg``
    (it includes the task reading it) less one, the median of ``samples`` readings
    ``interval`` s apart. None where there is no ``/proc/loadavg``."""
    counts = []
    for i in range(samples):
        try:
            with open("/proc/loadavg") as f:
                running = int(f.read().split()[3].split("/")[0])
        except (OSError, IndexError, ValueError):
            return None
        counts.append(max(running - 1, 0))
        if i + 1 < samples:
            time.sleep(interval)
    return int(statistics.median(counts))


def cpu_threads(cpus: Optional[int] = None, load1: Optional[float] = None,
                running: Optional[int] = None) -> int:
    """Threads for torch CPU work now: the usable CPUs less those other processes keep busy,
    at least 1.

    Busy CPUs: the smaller of the 1-minute load average and the other tasks runnable right
    now (``others_running``), rounded. The load average alone lags (it still counts this
    process's own previous work, e.g. the UNet pass just before); the instantaneous count
    alone is noisy; a load both see is real. Arguments default to the live values (given:
    for tests)."""
    cpus = usable_cpus() if cpus is None else max(int(cpus), 1)
    if load1 is None:
        try:
            load1 = os.getloadavg()[0]
        except OSError:
            load1 = 0.0
    if running is None:
        running = others_running()
    busy = load1 if running is None else min(load1, float(running))
    return max(1, min(cpus, cpus - int(busy + 0.5)))


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[int]:
    """Run the body with torch's intra-op threads set to ``n``; the previous count is restored
    after (also on errors). Yields ``n``."""
    before = torch.get_num_threads()
    n = max(int(n), 1)
    if n == before:
        yield n
        return
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)
