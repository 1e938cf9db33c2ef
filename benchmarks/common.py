"""Shared benchmark plumbing: environment facts and writing results (JSON + markdown)."""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def environment() -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    # GIT_COMMIT wins when set: the device machine's copy of the tree may carry a stale .git.
    env["git_commit"] = os.environ.get("GIT_COMMIT")
    if not env["git_commit"]:
        try:
            env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                               cwd=os.path.dirname(RESULTS)).stdout.strip() or "unknown"
        except OSError:
            env["git_commit"] = "unknown"
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["device_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    else:
        env["device"] = "cpu"
    return env


def write_results(name: str, payload: dict, table: str, out_dir: str | None = None) -> tuple[str, str]:
    out_dir = out_dir or RESULTS
    os.makedirs(out_dir, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = os.path.join(out_dir, f"{name}-{stamp}")
    with open(base + ".json", "w") as f:
        json.dump(payload, f, indent=1)
    env = payload["environment"]
    header = (f"# {name}\n\n{env['date']} · {env['device']} · torch {env['torch']} · triton {env.get('triton')} · "
              f"commit {env['git_commit'][:12]}\n\n`{env['command']}`\n\n")
    with open(base + ".md", "w") as f:
        f.write(header + table + "\n")
    return base + ".json", base + ".md"


def md_table(rows: list[dict], cols: list[str]) -> str:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(out)


def graph_time(fns, reps: int) -> float:
    """Median seconds per call of `fns`, captured `reps` times over in one CUDA graph and
    replayed 7 times (launch overhead amortized, as in a decode step's graph)."""
    for f in fns:
        f()  # compile / autotune outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            for f in fns:
                f()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(7):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / (reps * len(fns)))
    del g
    return statistics.median(times)
