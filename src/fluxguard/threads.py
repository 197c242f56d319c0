"""How many CPU threads torch gets: as many as there are free cores, so a busy machine does not stall protection.

torch's intra-op threads wait for each other after every operation. When another process holds one of the cores,
the thread that shares it is scheduled only part of the time, and every other thread waits for it at each of the
thousands of small operations of a protection: on two cores with one busy, ``protect --demo`` took 120 s with two
threads against 15 s with one (``benchmarks/results/threads.md``). :func:`choose_threads` therefore counts the cores
that are busy right now and leaves them out.

The thread count changes float rounding (the order of parallel sums), so the pixels of a protection depend on it:
the same seed and the same thread count give the same bytes. ``fluxguard protect --threads N`` pins it; the summary
records the count each run used.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator

log = logging.getLogger(__name__)

AUTO = "auto"
SAMPLE_S = 0.3  # how long the machine's CPU use is sampled before choosing


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def busy_cpus(sample_s: float = SAMPLE_S) -> float:
    """How many CPUs other processes keep busy now: the machine's CPU use over ``sample_s`` seconds, in CPUs."""
    import psutil

    return psutil.cpu_percent(interval=sample_s) / 100.0 * (psutil.cpu_count() or 1)


def choose_threads(requested: int | str | None = AUTO, *, sample_s: float = SAMPLE_S) -> int:
    """The torch thread count to use: ``requested`` when it is a number, else the free cores.

    Free cores: the usable CPUs minus those busy now (a CPU counts as busy from half its time on), at least one
    and at most torch's own default (physical cores, or ``OMP_NUM_THREADS``).
    """
    import torch

    if requested not in (None, AUTO):
        n = int(requested)
        if n < 1:
            raise ValueError(f"threads must be >= 1, got {n}")
        return n
    busy = math.floor(busy_cpus(sample_s) + 0.5)
    chosen = max(1, min(torch.get_num_threads(), usable_cpus() - busy))
    log.info("%d CPU(s) busy with other work: using %d torch thread(s)", busy, chosen)
    return chosen


@contextlib.contextmanager
def torch_threads(requested: int | str | None = AUTO) -> Iterator[int]:
    """Run the block with the chosen thread count (see :func:`choose_threads`), then restore the previous one."""
    import torch

    before = torch.get_num_threads()
    n = choose_threads(requested)
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)
