"""What every evaluation run records beside its numbers, and how it is written: JSON with the
environment (versions, device, commit, command) and a markdown table, into a chosen folder."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys

import torch


def _command() -> str:
    """The command line as typed: `bitfold ...` for the entry point and `python -m bitfold.cli`."""
    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0) == "bitfold" or argv0.endswith(os.path.join("bitfold", "cli.py")):
        return " ".join(["bitfold", *sys.argv[1:]])
    return " ".join([os.path.basename(sys.executable), *sys.argv])


def _git_commit() -> str:
    """GIT_COMMIT when set (a copied tree whose .git may be stale, as on the device machine), else
    HEAD's hash with '-dirty' when the working tree differs from it, else 'unknown'."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=here)
        if head.returncode != 0 or len(head.stdout.strip()) != 40:
            return os.environ.get("GIT_COMMIT", "unknown")
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=here).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("GIT_COMMIT", "unknown")


def environment(device: torch.device | None = None) -> dict:
    import bitfold

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": _command(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "bitfold": getattr(bitfold, "__version__", "unknown"),
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
    }
    env["git_commit"] = _git_commit()
    if device is not None and device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
    else:
        env["device"] = "cpu"
    return env


def stamp() -> str:
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def md_table(rows: list[dict], cols: list[str]) -> str:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(out)


def write_json(path: str, payload: dict) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    return path


def write_markdown(path: str, title: str, env: dict, body: str) -> str:
    header = (f"# {title}\n\n{env['date']} · {env['device']} · torch {env['torch']} · "
              f"commit {env['git_commit'][:12]}\n\n`{env['command']}`\n\n")
    with open(path, "w") as f:
        f.write(header + body.rstrip() + "\n")
    return path
