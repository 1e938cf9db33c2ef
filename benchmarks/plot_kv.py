"""One figure for the README's "Compressed KV cache" section, from committed results only:
capacity (32K-token sequences that fit in the same KV memory), decode speed at 32K beside each
point's roofline, and quality on Qwen2.5-Coder-1.5B (perplexity change and needle accuracy).

    python benchmarks/plot_kv.py --kv benchmarks/results/kv-llama3-8b-h200-20261204-133401.json \\
        --ppl benchmarks/results/eval-ppl-qwen-kv-h200.json --needle benchmarks/results/eval-needle-qwen-kv-h200.json \\
        --out benchmarks/results/kv-summary.png
"""
from __future__ import annotations

import argparse
import json


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kv", required=True)
    ap.add_argument("--ppl", required=True)
    ap.add_argument("--needle", required=True)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kv = json.load(open(args.kv))
    ppl = json.load(open(args.ppl))
    needle = json.load(open(args.needle))
    codecs = [c["codec"] for c in kv["capacity"]]
    ctx = args.context
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))

    ax = axes[0]
    seqs = [c["max_batch"][str(ctx)] if str(ctx) in c["max_batch"] else c["max_batch"][ctx] for c in kv["capacity"]]
    mb = {p["codec"]: p for p in kv["max_batch"] if "tok_s" in p}
    bars = ax.bar(codecs, seqs, color="tab:blue")
    for b, c in zip(bars, codecs):
        if c in mb:
            ax.annotate(f"{mb[c]['tok_s']:.0f} tok/s", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                        va="bottom", fontsize=8)
    ax.set_title(f"{ctx // 1024}K-token sequences in {kv['kv_budget_bytes'] / 2**30:.0f} GiB of KV\n"
                 "(label: decode throughput at that batch)", fontsize=9)
    ax.set_ylabel("sequences")

    ax = axes[1]
    width = 0.38
    for i, B in enumerate((1, 8)):
        pts = {p["codec"]: p for p in kv["decode"] if p["batch"] == B and p["context"] == ctx and "tok_s" in p}
        xs = [j + (i - 0.5) * width for j in range(len(codecs))]
        ax.bar(xs, [pts[c]["tok_s"] if c in pts else 0 for c in codecs], width, label=f"batch {B}")
        ax.scatter(xs, [pts[c]["roofline_tok_s"] if c in pts else 0 for c in codecs], marker="_", s=200, color="k",
                   zorder=3)
    ax.set_xticks(range(len(codecs)), codecs)
    ax.set_title(f"decode tok/s at {ctx // 1024}K, llama3-8b shape, H200 (black: roofline)", fontsize=9)
    ax.legend(fontsize=8)

    ax = axes[2]
    rows = {r["name"]: r for r in ppl["configs"]}
    names = [n for n in rows if n in codecs]
    ax.bar(names, [100 * (rows[n]["ppl"] / rows[names[0]]["ppl"] - 1) for n in names], color="tab:orange")
    acc = {c["name"]: c["accuracy"] for c in needle["configs"]}
    for i, n in enumerate(names):
        if n in acc:
            ax.annotate(f"needle {100 * acc[n]:.0f}%", (i, 0), ha="center", va="bottom", fontsize=8)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_title("Qwen2.5-Coder-1.5B: perplexity change vs bf16 KV (%)\n(label: needle accuracy 1K-16K)", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
