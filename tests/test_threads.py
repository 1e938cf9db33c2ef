"""Thread count from the cores actually free: two threads on a 2-core machine with one core
busy spin against each other at every parallel region (loading SmolLM2 with int4 weights took
118 s instead of 8.5 s), so an engine computes with the cores other processes leave idle."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from bitfold import threads
from bitfold.errors import BitfoldError


@pytest.fixture
def restore_threads(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_last", None)  # measure afresh
    monkeypatch.setattr(threads, "_ceiling", None)
    yield
    torch.set_num_threads(before)


def test_free_cores_from_proc_stat(monkeypatch):
    """Idle share of the process's CPUs between two /proc/stat reads (iowait idle, steal busy)."""
    stat = iter(["cpu  0 0 0 0 0 0 0 0\ncpu0 100 0 50 800 50 0 0 0 0 0\ncpu1 500 0 0 500 0 0 0 0 0 0\n"
                 "cpu2 0 0 0 9999 0 0 0 0 0 0\n",
                 "cpu  0 0 0 0 0 0 0 0\ncpu0 100 0 50 880 70 0 0 0 0 0\ncpu1 590 0 0 500 0 0 0 10 0 0\n"
                 "cpu2 0 0 0 99999 0 0 0 0 0 0\n"])

    class Stat:
        def __init__(self, *a):
            self.text = next(stat)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def readlines(self):
            return self.text.splitlines(keepends=True)

    monkeypatch.setattr(threads, "usable_cpus", lambda: {0, 1})  # cpu2 is not ours
    monkeypatch.setattr(threads, "open", Stat, raising=False)
    # cpu0: 100 of 100 jiffies idle; cpu1: 0 of 100 (90 user + 10 stolen): one core free of two.
    assert threads.free_cores(sample_s=0) == pytest.approx(1.0)


def test_busy_cores_lower_the_thread_count(restore_threads):
    """Every core but one kept busy by other processes: an engine's default is one thread."""
    cpus = threads.usable_cpus()
    if len(cpus) < 2:
        pytest.skip("one CPU: nothing to lower")
    torch.set_num_threads(len(cpus))
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(len(cpus))]
    try:
        time.sleep(0.3)
        assert threads.free_cores() < 0.7
        assert threads.configure_threads() == 1 == torch.get_num_threads()
        assert threads.configure_threads(2) == 2 == torch.get_num_threads()  # an explicit count wins
    finally:
        for h in hogs:
            h.kill()
            h.wait()


def test_never_more_threads_than_torch_was_given(restore_threads, monkeypatch):
    monkeypatch.setattr(threads, "free_cores", lambda sample_s=0: 64.0)
    torch.set_num_threads(1)
    assert threads.configure_threads() == 1
    torch.set_num_threads(2)
    assert threads.choose_num_threads() == 2
    monkeypatch.setattr(threads, "_last", None)
    monkeypatch.setattr(threads, "free_cores", lambda sample_s=0: 1.69)  # a core 31% busy is not free
    assert threads.choose_num_threads() == 1


def test_engine_takes_num_threads(restore_threads, tiny_model_dir):
    from bitfold import LLM

    llm = LLM(str(tiny_model_dir), device="cpu", num_kv_blocks=8, num_threads=1)
    assert torch.get_num_threads() == 1 and llm.engine.config.num_threads == 1
    for bad in (0, -2, 1.5):
        with pytest.raises(BitfoldError, match="num_threads"):
            LLM(str(tiny_model_dir), device="cpu", num_kv_blocks=8, num_threads=bad)


def test_a_quieter_machine_gets_its_threads_back(restore_threads, monkeypatch):
    """Lowered at one engine's load, the count goes back up at a later one when cores are free
    again, but not above what the user set meanwhile."""
    torch.set_num_threads(2)
    monkeypatch.setattr(threads, "free_cores", lambda sample_s=0: 1.0)
    assert threads.configure_threads() == 1 == torch.get_num_threads()
    monkeypatch.setattr(threads, "_last", None)
    monkeypatch.setattr(threads, "free_cores", lambda sample_s=0: 2.0)
    assert threads.configure_threads() == 2 == torch.get_num_threads()
    torch.set_num_threads(1)  # the user's own choice
    monkeypatch.setattr(threads, "_last", None)
    assert threads.configure_threads() == 1
