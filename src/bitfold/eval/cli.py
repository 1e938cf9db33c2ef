"""`bitfold eval corpora | ppl | needle`: what compression costs in quality.

    bitfold eval corpora
    bitfold eval ppl --config fp32:dtype=float32 --config bf16:dtype=bfloat16 --limit 16
    bitfold eval needle --lengths 1k,2k,4k --depths 0,0.25,0.5,0.75,1 --seeds 3

The engine flags (--model, --device, --dtype, ...) are the base every `--config` overrides;
the first configuration is the reference. Results (JSON, markdown, PNG) go to --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import json
import os
import sys

from bitfold.config import EngineConfig, add_dataclass_args, dataclass_from_args
from bitfold.errors import BitfoldError


def register(sub) -> None:
    p = sub.add_parser("eval", help="measure quality: perplexity, KL divergence, needle retrieval",
                       description="Measure what compression costs in quality, on real text from installed corpora.")
    esub = p.add_subparsers(dest="eval_command", required=True)

    c = esub.add_parser("corpora", help="list the evaluation corpora and how to install missing ones")
    c.add_argument("--corpus-dir", action="append", default=[], metavar="DIR",
                   help="where to look for npm corpora (a node_modules folder or the folder holding one)")
    c.set_defaults(func=cmd_corpora)

    ppl = esub.add_parser("ppl", help="perplexity, KL and top-1 agreement via teacher-forced decode over the KV cache")
    _common(ppl, out_name="ppl")
    g = ppl.add_argument_group("windows")
    g.add_argument("--context", type=int, default=512, help="tokens per window")
    g.add_argument("--windows", type=int, default=32, help="windows in the seeded sample")
    g.add_argument("--prefill", type=int, default=0,
                   help="tokens of each window prefilled at once; the rest are decoded one by one")
    g.add_argument("--score-prefill", action="store_true", help="also score the prefilled positions")
    g.add_argument("--batch", type=int, default=16, help="windows decoded together per step")
    ppl.set_defaults(func=cmd_ppl)

    nd = esub.add_parser("needle", help="passkey retrieval from real-text haystacks per length and depth")
    _common(nd, out_name="needle")
    g = nd.add_argument_group("trials")
    g.add_argument("--lengths", default="1k,2k,4k", help="prompt lengths in tokens, e.g. 1k,2k,4k,8k,16k (k = 1024)")
    g.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle positions as fractions of the haystack")
    g.add_argument("--seeds", type=int, default=3, help="trials per (length, depth), each with its own haystack and key")
    g.add_argument("--max-tokens", type=int, default=12, help="answer tokens generated (greedy)")
    g.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="use the model's chat template when it has one")
    nd.set_defaults(func=cmd_needle)


def _common(p: argparse.ArgumentParser, out_name: str) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--config", action="append", default=None, metavar="NAME[:KEY=VALUE,...]",
                   help="a configuration: engine settings over the engine flags, e.g. bf16:dtype=bfloat16 "
                        "(repeatable; the first is the reference)")
    g.add_argument("--corpus", default="wiki", help="text corpus (`bitfold eval corpora` lists them)")
    g.add_argument("--corpus-dir", action="append", default=[], metavar="DIR", help="where to look for npm corpora")
    g.add_argument("--seed", type=int, default=0, help="seed of the text sample")
    g.add_argument("--limit", type=int, default=None, help="only the first N windows / trials (quick checks)")
    g.add_argument("--out", default="eval-results", help="folder for the JSON, markdown and PNG results")
    g.add_argument("--name", default=None, help=f"file name stem (default {out_name}-<corpus>-<time>)")
    g.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True, help="write PNG figures")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars on stderr")
    add_dataclass_args(p.add_argument_group("engine (the base every --config overrides)"), EngineConfig)


def _say(msg: str) -> None:
    print(f"[bitfold] {msg}", file=sys.stderr, flush=True)


def _positive(args, *names: str) -> None:
    for n in names:
        v = getattr(args, n)
        if v is not None and v < 1:
            raise BitfoldError(f"--{n.replace('_', '-')} must be at least 1, got {v}")


def _engine_info(engine) -> dict:
    r = engine.runner
    return {"device": str(engine.device), "dtype": str(engine.dtype).removeprefix("torch."),
            "kv_cache": r.kv_spec.codec.name, "kv_residual": r.kv_spec.codec.residual,
            "kv_rotate": r.kv_spec.codec.rotate,
            "kv_key_offset": any(getattr(st, "k_offset", None) is not None for st in r.kv_caches),
            "kv_bits_per_element": r.kv_spec.codec.bits_per_element,
            "attention_backend": r.backend.name, "block_size": engine.config.block_size,
            "weights": engine.model_path, "cuda_graphs": r.graphs is not None}


def _prepare(args, name: str):
    """Configurations, documents, the base model's source and tokenizer: everything checkable
    before any weights load."""
    from bitfold.eval.configs import parse_configs
    from bitfold.eval.corpora import load_documents
    from bitfold.loader import open_model

    configs = parse_configs(args.config)
    base = dataclass_from_args(EngineConfig, args)
    base.validate()
    docs = load_documents(args.corpus, args.corpus_dir)
    if args.plot and name == "needle":
        from bitfold.eval.plots import have_matplotlib

        if not have_matplotlib():
            raise BitfoldError("needle plots need matplotlib: pip install matplotlib, or pass --no-plot")
    source = open_model(base.model)
    tokenizer = source.load_tokenizer() if source.load_tokenizer else None
    if tokenizer is None:
        raise BitfoldError(f"{source.path} has no tokenizer; evaluation needs one to tokenize the corpus")
    from bitfold.eval.results import stamp

    stem = os.path.join(args.out, args.name or f"{name}-{args.corpus}-{stamp()}")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise BitfoldError(f"--out {args.out}: cannot create the results folder ({e.strerror or e})") from None
    return configs, base, docs, source, tokenizer, stem


def _build(cfg: EngineConfig, base: EngineConfig, source, spec):
    """The configuration's engine; the base model's already-open source is reused."""
    from bitfold.engine import LLMEngine

    _say(f"loading configuration {spec.name!r}: {spec.describe()}")
    return LLMEngine(cfg, source=source if cfg.model == base.model else None)


def cmd_corpora(args) -> None:
    from bitfold.eval.corpora import list_corpora

    rows = list_corpora(args.corpus_dir)
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        print(f"{r['name']:<{width}}  {'installed' if r['path'] else 'missing  '}  {r['description']}")
        print(f"{'':<{width}}  {'':9}  {r['path'] or 'install: ' + r['install']}")


def cmd_ppl(args) -> None:
    from bitfold.core.kv_manager import blocks_for
    from bitfold.eval import results
    from bitfold.eval.ppl import sample_windows, score_windows

    _positive(args, "context", "windows", "batch", "limit")
    if not 0 <= args.prefill <= args.context - 2:
        raise BitfoldError(f"--prefill {args.prefill} must leave at least one decode step: 0 <= prefill <= "
                           f"{args.context - 2} for --context {args.context}")
    configs, base, docs, source, tok, stem = _prepare(args, "ppl")
    if args.context > source.max_context:
        raise BitfoldError(f"--context {args.context} exceeds the model's context length {source.max_context}")
    windows = sample_windows(tok, docs, args.windows, args.context, args.seed)[: args.limit]
    batch = min(args.batch, len(windows))
    engines, info = {}, {}
    for c in configs:
        cfg = c.engine_config(base, max_model_len=args.context)
        if cfg.num_kv_blocks is None and cfg.kv_cache_memory_gb is None:  # one batch of windows, no more
            cfg = dataclasses.replace(cfg, num_kv_blocks=batch * blocks_for(args.context, cfg.effective_block_size()))
        if "max_num_seqs" not in c.overrides:  # CUDA graphs for exactly the batch sizes used
            cfg = dataclasses.replace(cfg, max_num_seqs=batch)
        engines[c.name] = _build(cfg, base, source, c)
        info[c.name] = _engine_info(engines[c.name])
    out = score_windows(engines, windows, prefill=args.prefill, score_prefill=args.score_prefill, batch=batch,
                        progress=args.progress)
    device = next(iter(engines.values())).device
    del engines
    digest = hashlib.sha256(json.dumps(windows).encode()).hexdigest()[:16]
    rows = []
    ref = out["configs"][configs[0].name]
    for c in configs:
        m = out["configs"][c.name]
        rows.append({"config": c.name, "settings": c.describe(), "ppl": f"{m['ppl']:.4f}",
                     "Δppl": "ref" if c is configs[0] else f"{100 * (m['ppl'] / ref['ppl'] - 1):+.3f}%",
                     "KL mean": f"{m['kl_mean']:.2e}", "KL p99": f"{m['kl_p99']:.2e}",
                     "top-1 agree": f"{100 * m['top1_agreement']:.2f}%", "top-1 acc": f"{100 * m['top1_accuracy']:.2f}%",
                     "s": f"{m['seconds']:.1f}"})
    table = results.md_table(rows, list(rows[0]))
    env = results.environment(device)
    what = (f"{os.path.basename(source.path)} · corpus {args.corpus} · {len(windows)} windows x {args.context} tokens "
            f"(seed {args.seed}, sample {digest}) · prefill {args.prefill} · {ref['tokens']} tokens scored per "
            f"configuration{' (prefill included)' if args.score_prefill else ', all by decode'} · reference "
            f"{configs[0].name!r}")
    payload = {"kind": "ppl", "environment": env, "model": source.path, "corpus": args.corpus,
               "windows": {"count": len(windows), "context": args.context, "seed": args.seed, "prefill": args.prefill,
                           "score_prefill": args.score_prefill, "batch": batch, "sha256_16": digest},
               "reference": configs[0].name,
               "configs": [{"name": c.name, "spec": c.spec, "overrides": c.overrides, "engine": info[c.name],
                            **out["configs"][c.name]} for c in configs],
               "positions": out["positions"], "position_counts": out["position_counts"]}
    written = [results.write_json(stem + ".json", payload),
               results.write_markdown(stem + ".md", "bitfold eval ppl", env, what + "\n\n" + table)]
    if args.plot:
        from bitfold.eval.plots import have_matplotlib, ppl_positions

        if have_matplotlib():
            title = (f"{os.path.basename(source.path)} · {args.corpus} · {len(windows)} windows x {args.context} "
                     "tokens, teacher-forced decode")
            written.append(ppl_positions(out["positions"], out["position_counts"], title, stem + ".png"))
        else:
            _say("matplotlib is not installed: no figure (pip install matplotlib)")
    print(what + "\n\n" + table)
    _say("wrote " + ", ".join(written))


def cmd_needle(args) -> None:
    import torch

    from bitfold.eval import results
    from bitfold.eval.needle import accuracy_grid, is_correct, make_trials, parse_depths, parse_lengths, run_trials

    _positive(args, "seeds", "max_tokens", "limit")
    lengths, depths = parse_lengths(args.lengths), parse_depths(args.depths)
    configs, base, docs, source, tok, stem = _prepare(args, "needle")
    if max(lengths) + args.max_tokens > source.max_context:
        raise BitfoldError(f"--lengths up to {max(lengths)} tokens (+ {args.max_tokens} answer tokens) exceed the "
                           f"model's context length {source.max_context} ({source.path})")
    seeds = list(range(args.seed, args.seed + args.seeds))
    trials = make_trials(tok, docs, lengths, depths, seeds, chat=args.chat)[: args.limit]
    need = min(source.max_context, max(len(t.prompt_ids) for t in trials) + args.max_tokens)
    per_config, info, device = {}, {}, None
    for c in configs:
        cfg = c.engine_config(base, max_model_len=need)
        if cfg.max_model_len < need:
            raise BitfoldError(f"config {c.name!r}: max_model_len={cfg.max_model_len} is shorter than the longest "
                               f"trial ({need} tokens with the answer)")
        engine = _build(cfg, base, source, c)
        info[c.name], device = _engine_info(engine), engine.device
        answers = run_trials(engine, trials, args.max_tokens, progress=args.progress, desc=f"needle {c.name}")
        correct = [is_correct(a, t.key) for a, t in zip(answers, trials)]
        per_config[c.name] = {"answers": answers, "correct": correct,
                              "grid": accuracy_grid(trials, correct, lengths, depths),
                              "accuracy": sum(correct) / len(correct)}
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    env = results.environment(device)
    cols = ["config", "length"] + [f"{d:.0%}" for d in depths] + ["mean"]
    rows = []
    for c in configs:
        for i, length in enumerate(lengths):
            cells = per_config[c.name]["grid"][i]
            seen = [v for v in cells if v == v]
            rows.append({"config": c.name, "length": length, **{f"{d:.0%}": "-" if v != v else f"{v:.2f}"
                                                                for d, v in zip(depths, cells)},
                         "mean": f"{sum(seen) / len(seen):.2f}" if seen else "-"})
    table = results.md_table(rows, cols)
    chat = args.chat and tok.chat_template is not None
    what = (f"{os.path.basename(source.path)} · haystack corpus {args.corpus} · {len(trials)} trials "
            f"({len(seeds)} seeds from {args.seed}) · {'chat template' if chat else 'plain prompt'} · greedy, "
            f"{args.max_tokens} answer tokens · accuracy per (length in tokens, needle depth)")
    payload = {"kind": "needle", "environment": env, "model": source.path, "corpus": args.corpus,
               "lengths": lengths, "depths": depths, "seeds": seeds, "chat": chat, "max_tokens": args.max_tokens,
               "configs": [{"name": c.name, "spec": c.spec, "overrides": c.overrides, "engine": info[c.name],
                            "accuracy": per_config[c.name]["accuracy"], "grid": per_config[c.name]["grid"]}
                           for c in configs],
               "trials": [{"length": t.length, "depth": t.depth, "seed": t.seed, "key": t.key,
                           "prompt_tokens": len(t.prompt_ids), "needle_depth": round(t.needle_depth, 4),
                           **{c.name: {"answer": per_config[c.name]["answers"][k],
                                       "correct": per_config[c.name]["correct"][k]} for c in configs}}
                          for k, t in enumerate(trials)]}
    written = [results.write_json(stem + ".json", payload),
               results.write_markdown(stem + ".md", "bitfold eval needle", env, what + "\n\n" + table)]
    if args.plot:
        from bitfold.eval.plots import needle_compare, needle_heatmap

        title = f"{os.path.splitext(os.path.basename(source.path))[0]}: passkey retrieval"
        for c in configs:
            written.append(needle_heatmap(per_config[c.name]["grid"], lengths, depths, f"{title}\n{c.name}",
                                          f"{stem}-{c.name}.png"))
        written.append(needle_compare({c.name: per_config[c.name]["grid"] for c in configs}, lengths, depths, title,
                                      f"{stem}-compare.png"))
    print(what + "\n\n" + table)
    _say("wrote " + ", ".join(written))
