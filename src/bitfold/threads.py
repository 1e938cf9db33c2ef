"""How many CPU threads bitfold computes with: the cores that are actually free.

PyTorch's intra-op pool (OpenMP) and the LUT kernel's pool (`kernels/cpu/lut_gemm.cpp`, which
takes `torch.get_num_threads()` per call) both start one thread per core and spin at their
barriers. When another process holds one of the cores, every parallel region waits for the
thread that has no core: on a 2-core machine with one core busy, quantizing SmolLM2 at load
took 118 s with 2 threads and 8.5 s with 1, and Qwen2.5-1.5B 364-707 s against 94 s.

So at engine start (and before `bitfold quantize`) the number of threads is lowered to the
cores left idle by everything else, measured over a short window from `/proc/stat` (per CPU
this process may run on; time stolen by the hypervisor counts as busy) while this process
sleeps. It is never raised above what torch was given (`OMP_NUM_THREADS`, `torch.set_num_threads`;
a later engine in the same process may go back up to it), and `EngineConfig.num_threads`
(`--num-threads`) sets it outright. The choice holds until the next engine is built (torch's
pool is process-wide): a busy machine at load means fewer threads for decoding too, which `-v`
logs.
"""
from __future__ import annotations

import logging
import os
import time

import torch

from bitfold.errors import BitfoldError

log = logging.getLogger("bitfold")

SAMPLE_S = 0.1  # how long to watch the CPUs
REUSE_S = 30.0  # engines built within this long of a measurement reuse it (tests build many)
# A core counts as free once it is idle this much: 2 threads against a core 40% busy with
# someone else already wait at every barrier.
FREE_CORE = 0.7

_last: tuple[float, float] | None = None  # (monotonic time, free cores) of the last measurement
# (the count torch had before bitfold first lowered it, the count bitfold set): a later engine
# may go back up to the first when the machine is quieter, unless someone else changed torch's
# count since (then that is the new ceiling).
_ceiling: tuple[int, int] | None = None


def _cpu_times(cpus: set[int]) -> tuple[float, float] | None:
    """(idle, total) jiffies summed over `cpus`, from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat") as f:
            lines = f.readlines()
    except OSError:
        return None
    idle = total = 0.0
    seen = 0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        # user nice system idle iowait irq softirq steal (guest time is already inside user)
        values = [float(v) for v in fields[:8]]
        idle += values[3] + values[4]
        total += sum(values)
        seen += 1
    return (idle, total) if seen else None


def usable_cpus() -> set[int]:
    """The CPUs this process may run on (its affinity mask, e.g. a container's cpuset)."""
    try:
        return os.sched_getaffinity(0)
    except (AttributeError, OSError):  # not Linux
        return set(range(os.cpu_count() or 1))


def free_cores(sample_s: float = SAMPLE_S) -> float:
    """How many of this process's CPUs sat idle over the next `sample_s` seconds (this thread
    sleeps meanwhile, so its own work does not count); all of them when it cannot be measured."""
    cpus = usable_cpus()
    before = _cpu_times(cpus)
    if before is None:
        return float(len(cpus))
    time.sleep(sample_s)
    after = _cpu_times(cpus)
    if after is None or after[1] <= before[1]:
        return float(len(cpus))
    return len(cpus) * (after[0] - before[0]) / (after[1] - before[1])


def choose_num_threads(requested: int | None = None) -> int:
    """Threads to compute with: `requested` when given, else the free cores (at least 1, at most
    torch's current count)."""
    global _last
    if requested is not None:
        if not isinstance(requested, int) or isinstance(requested, bool) or requested < 1:
            raise BitfoldError(f"invalid engine setting num_threads={requested!r}: expected an integer >= 1 "
                               "(or None to use the free cores)")
        return requested
    current = torch.get_num_threads()
    if _ceiling is not None and _ceiling[1] == current:
        current = _ceiling[0]
    if current <= 1:
        return current
    now = time.monotonic()
    if _last is None or now - _last[0] > REUSE_S:
        _last = (now, free_cores())
    free = int(_last[1] + (1 - FREE_CORE))
    return max(1, min(current, free))


def configure_threads(requested: int | None = None) -> int:
    """Set torch's (and so the LUT kernel's) thread count for this process; returns it."""
    global _ceiling
    before = torch.get_num_threads()
    n = choose_num_threads(requested)
    if requested is None:
        ceiling = _ceiling[0] if _ceiling is not None and _ceiling[1] == before else before
        _ceiling = (ceiling, n)
    else:
        _ceiling = None  # an explicit count: later automatic choices start from it
    if n != before:
        torch.set_num_threads(n)
    if requested is None and _ceiling is not None and n < _ceiling[0]:
        log.info("computing with %d of %d threads: %.1f of %d cores were free at load (--num-threads overrides)",
                 n, _ceiling[0], _last[1] if _last else float("nan"), len(usable_cpus()))
    else:
        log.info("computing with %d CPU threads", n)
    return n
