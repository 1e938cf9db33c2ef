"""Quality baseline of the default model: `bitfold eval ppl` and `bitfold eval needle` with
uncompressed configurations, results (JSON, markdown, PNG) into benchmarks/results/.

On the CPU the reference is fp32 and bf16 is compared against it; on a GPU the same command
compares bf16 against fp32 there. Compressed configurations (KV codecs, weight formats) are
judged later by adding `--config` entries to these same commands.

    python benchmarks/eval_baseline.py                       # CPU defaults below
    python benchmarks/eval_baseline.py --windows 32 --context 512 --lengths 1k,2k,4k --seeds 3
"""
from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--device", default="auto")
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--lengths", default="1k,2k")
    p.add_argument("--depths", default="0,0.5,1")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--configs", default="fp32:dtype=float32;bf16:dtype=bfloat16",
                   help="';'-separated --config values, the reference first")
    p.add_argument("--skip", choices=["ppl", "needle"], default=None)
    args = p.parse_args()
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    common = ["--device", args.device, "--out", RESULTS] + (["--model", args.model] if args.model else [])
    for c in args.configs.split(";"):
        common += ["--config", c]
    runs = {
        "ppl": ["ppl", "--windows", str(args.windows), "--context", str(args.context), "--name", f"eval-ppl-{stamp}"],
        "needle": ["needle", "--lengths", args.lengths, "--depths", args.depths, "--seeds", str(args.seeds),
                   "--name", f"eval-needle-{stamp}"],
    }
    for kind, argv in runs.items():
        if kind == args.skip:
            continue
        cmd = [sys.executable, "-m", "bitfold.cli", "eval", *argv, *common]
        print("$ bitfold " + " ".join(cmd[3:]), file=sys.stderr, flush=True)
        rc = subprocess.run(cmd).returncode
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
