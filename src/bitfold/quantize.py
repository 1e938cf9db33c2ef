"""`bitfold quantize --model M --format int2-g64 --out DIR`: a checkpoint whose linear layers are
stored in a low-bit format, which `bitfold generate --model DIR` loads without rounding again.

Each linear weight is rounded to nearest per group over a searched range (`lowbit.quantize_rtn`,
exactly what `--weights FORMAT` does at load), or converted without a float round trip where a
GGUF block type lines up with the format (Q4_0/Q4_1/Q4_K -> int4-g32, Q2_K -> int2-g16). DIR gets:

- model.safetensors (model-0000i-of-0000n.safetensors + index past --max-shard-size). A linear
  weight `<name>.weight` [rows, in_features], with K = in_features padded to whole groups, is
    <name>.qweight  uint8 [bits, rows, K / 8]  bit plane p holds bit p of every code; code k is
                                               bit k % 8 of byte k // 8 (little-endian)
    <name>.scales   fp16 [rows, K / group]
    <name>.mins     fp16 [rows, K / group]     w[n, k] ~= scales[n, k // group] * q[n, k] + mins[n, k // group]
  A tied model also gets `lm_head.*`, the output layer's codes (4-bit under int1-3 and
  ternary). Embeddings, norms and biases stay float: as stored (--dense-dtype auto; float32
  narrowed to fp16 or bf16 only where that is exact) or cast.
- config.json with `quantization_config` {"quant_method": "bitfold", "format", "bits",
  "group_size", "ternary", "lm_head_format", "bits_per_weight" (the decoder linears' average:
  codes + scales + mins), ...}; from a GGUF, the HF config of its metadata. A mixed-precision
  checkpoint (`--bits-per-weight`, see allocation.py) adds "overrides": {module name of each
  shard stored in another format, e.g. "model.layers.3.mlp.down_proj": "int4-g64"} and
  "allocation" (how the plan was chosen); its qweight tensors have that format's bit planes.
- the tokenizer: copied from an HF folder; from a GGUF, the tokenizer.json bitfold builds from
  its metadata, written only if reading it back gives the same tokenizer.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from bitfold.errors import BitfoldError, ModelLoadError
from bitfold.progress import progress

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")
DENSE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def register(sub) -> None:
    p = sub.add_parser("quantize", help="write a low-bit checkpoint (round to nearest) that loads as it is",
                       description="Quantize a checkpoint's linear layers into a low-bit format and write an HF-style "
                                   "folder (safetensors + config.json with quantization_config + tokenizer) that "
                                   "`bitfold generate --model DIR` and `bitfold chat` load directly.")
    p.add_argument("--model", default=None, help="HF model folder or .gguf file (default: the embedded SmolLM2)")
    p.add_argument("--format", required=True,
                   help="low-bit format: int4, int3, int2, int1 or ternary, with -g16/-g32/-g64/-g128 groups "
                        "(bare name: -g64); e.g. int2-g64")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created; must not exist or be empty)")
    p.add_argument("--max-shard-size", default="4GB", help="largest safetensors file, e.g. 500MB, 4GB")
    p.add_argument("--dense-dtype", default="auto", choices=["auto", *DENSE_DTYPES],
                   help="embeddings, norms and biases: auto keeps their precision exactly; float16/bfloat16 "
                        "halve a float32 embedding at a rounding cost")
    c = p.add_argument_group("calibration (--method awq|gptq; see bitfold/calibration.py)")
    c.add_argument("--method", default="rtn",
                   help="rtn: round to nearest over a searched range, no data; awq: activation-aware scales "
                        "(arXiv 2306.00978) then rtn; gptq: error-compensating rounding (arXiv 2210.17323)")
    c.add_argument("--calib-samples", type=int, default=64, help="calibration sequences of Wikipedia text")
    c.add_argument("--calib-len", type=int, default=512, help="tokens per calibration sequence")
    c.add_argument("--calib-seed", type=int, default=0, help="seed of the calibration sample")
    c.add_argument("--act-order", action="store_true",
                   help="gptq: round columns by decreasing activation energy (group ranges fixed up front)")
    m = p.add_argument_group("mixed precision (see bitfold/allocation.py)")
    m.add_argument("--bits-per-weight", type=float, default=None, metavar="B",
                   help="store the merged linears whose rounding costs most per extra bit in --upgrade-format, until "
                        "the decoder linears average B stored bits per weight (codes + fp16 scale and min per group: "
                        "int3-g64 is 3.5, int4-g64 4.5); measured on the calibration text (with --method rtn the "
                        "text only chooses the plan)")
    m.add_argument("--upgrade-format", default=None, metavar="FMT",
                   help="the wider format of --bits-per-weight (default: one bit more, same group: int3-g64 -> "
                        "int4-g64)")
    p.set_defaults(func=cmd_quantize)


@dataclass
class QuantizeSummary:
    source: str
    out: str
    format: str
    head_format: str | None
    layers: int  # decoder layers
    linear_tensors: int
    linear_params: int  # weights of the linear layers (lm_head included)
    linear_bytes: int  # their qweight + scales + mins
    converted: int  # linear tensors taken from GGUF blocks without rounding again
    dense_tensors: int
    dense_params: int
    dense_bytes: int
    dense_dtypes: dict  # dtype name -> tensors stored in it
    files: int
    disk_bytes: int
    seconds: float
    method: str = "rtn"
    allocation: object = None  # allocation.Allocation of a mixed-precision checkpoint

    def lines(self) -> list[str]:
        mb = lambda n: f"{n / 1e6:.1f} MB"  # noqa: E731
        head = f"; lm_head {self.head_format}" if self.head_format and self.head_format != self.format else ""
        how = (f"{self.converted} converted from GGUF blocks, {self.linear_tensors - self.converted} rounded to nearest"
               if self.converted else "rounded to nearest")
        if self.method != "rtn":
            how = f"decoder layers by {self.method}, the output layer rounded to nearest"
        params = self.linear_params + self.dense_params
        return [
            f"[bitfold] quantized {self.source} -> {self.out} ({self.format}) in {self.seconds:.1f}s",
            f"  linear: {self.linear_tensors} tensors in {self.layers} layers, {self.linear_params / 1e6:.1f}M weights "
            f"-> {mb(self.linear_bytes)} ({8 * self.linear_bytes / self.linear_params:.2f} bits/weight{head}; {how})",
            f"  dense:  {self.dense_tensors} tensors (embeddings, norms, biases), "
            f"{self.dense_params / 1e6:.1f}M values -> {mb(self.dense_bytes)} ({', '.join(f'{n} {k}' for k, n in sorted(self.dense_dtypes.items()))})",
            f"  disk:   {self.files} safetensors file{'s' if self.files > 1 else ''}, {mb(self.disk_bytes)} in all "
            f"({8 * self.disk_bytes / params:.2f} bits per parameter overall)",
        ] + ([] if self.allocation is None else [
            f"  mixed:  {len(self.allocation.overrides)} of {self.allocation.linears} merged decoder linears in "
            f"{self.allocation.upgrade.name}, {self.allocation.bits_per_weight:.3f} bits per weight over the decoder "
            f"linears (budget {self.allocation.budget:g})"])


def cmd_quantize(args) -> None:
    from bitfold.calibration import METHODS, CalibConfig

    from bitfold.allocation import MixedConfig

    if args.method not in METHODS:
        raise BitfoldError(f"--method {args.method!r}: expected one of {', '.join(METHODS)}")
    calib = CalibConfig(method=args.method, samples=args.calib_samples, length=args.calib_len, seed=args.calib_seed,
                        act_order=args.act_order)
    calib.validate()  # bad calibration flags are refused even where rtn would not read them
    if args.upgrade_format is not None and args.bits_per_weight is None:
        raise BitfoldError("--upgrade-format is the wider format of a mixed-precision plan; give --bits-per-weight too")
    mixed = None if args.bits_per_weight is None else MixedConfig(args.bits_per_weight, args.upgrade_format)
    calib = None if args.method == "rtn" and mixed is None else calib  # rtn reads text only to plan mixed bits
    summary = quantize(args.model, args.format, args.out, max_shard_bytes=parse_size(args.max_shard_size),
                       dense_dtype=args.dense_dtype, calib=calib, mixed=mixed)
    print("\n".join(summary.lines()))


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)i?B?\s*", text, re.IGNORECASE)
    if not m:
        raise BitfoldError(f"--max-shard-size {text!r}: expected a size such as 500MB or 4GB")
    return int(float(m.group(1)) * 1000 ** " KMG".index(m.group(2).upper() or " "))


def quantize(model: str | None, fmt: str, out: str, max_shard_bytes: int = 4 * 10**9,
             dense_dtype: str = "auto", calib=None, mixed=None) -> QuantizeSummary:
    """Quantize `model` (HF folder, .gguf, None = the default model) into folder `out`; with
    `calib` (a calibration.CalibConfig, method awq | gptq) the decoder layers' linears by AWQ or
    GPTQ on calibration text, the output layer still by round to nearest. With `mixed` (an
    allocation.MixedConfig; needs `calib`, whose method may then be rtn: the text only plans)
    the merged decoder linears whose rounding costs most per extra bit are stored in the wider
    format, up to `mixed.bits_per_weight` on average (allocation.py); config.json records them
    in quantization_config.overrides."""
    from bitfold.allocation import check_budget, decoder_linears, upgrade_spec
    from bitfold.engine import warn_if_rounding_breaks
    from bitfold.loader import open_model
    from bitfold.models import MODELS
    from bitfold.models.format_plan import MERGED_LINEARS, FormatPlan, linear_formats
    from bitfold.threads import configure_threads
    from bitfold.weights import WEIGHT_FORMATS
    from bitfold.weights.lowbit import ROUNDINGS, lowbit_spec

    t0 = time.perf_counter()
    spec = lowbit_spec(fmt) if fmt in WEIGHT_FORMATS else None
    if spec is None:
        known = ", ".join(n for n in WEIGHT_FORMATS.names() if lowbit_spec(n) is not None)
        raise BitfoldError(f"--format {fmt!r} is not a low-bit format; known: {known}")
    if dense_dtype != "auto" and dense_dtype not in DENSE_DTYPES:
        raise BitfoldError(f"--dense-dtype {dense_dtype!r}: expected auto, {', '.join(DENSE_DTYPES)}")
    if max_shard_bytes < 1:
        raise BitfoldError("--max-shard-size must be positive")
    wide = None
    if mixed is not None:
        if calib is None:
            raise BitfoldError("--bits-per-weight measures each linear on calibration text: pass a CalibConfig")
        wide = upgrade_spec(spec, mixed.upgrade)
    if calib is not None:
        from bitfold.weights.calibrate import supports

        calib.validate()
        for s in (spec, wide) if calib.method != "rtn" else ():
            why = s and supports(s)
            if why:
                raise BitfoldError(f"--method {calib.method} cannot produce {s.name}: {why}")
    out = os.path.abspath(os.path.expanduser(out))
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise BitfoldError(f"{out}: already exists and is not an empty folder; choose a new --out")
    source = open_model(model)
    if source.weight_format is not None and source.format != "gguf":  # GGUF blocks convert (or round) per tensor
        raise BitfoldError(f"{source.path}: already quantized as {source.weight_format}; quantize its original")

    model_cls = MODELS.get(source.config.architecture)
    cfg = replace(source.config, **model_cls.config_overrides)
    with torch.device("meta"):  # the layers say which tensors are linear weights and in which format
        skeleton = model_cls(cfg, torch.float32, max_positions=1, fmt=spec.name)
    if mixed is not None:  # before the calibration text loads: a budget out of range fails at once
        check_budget(decoder_linears(skeleton), spec, wide, mixed.bits_per_weight)

    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    if calib is None or calib.method == "rtn":  # the warning is about data-free rounding
        warn_if_rounding_breaks(fmt, None, flag="--format")
    configure_threads()  # rounding is parallel torch code: as many threads as there are free cores
    calibrated = allocation = None
    plan = FormatPlan(spec.name)
    if calib is not None:  # before the temp folder: a missing corpus fails with nothing to clean up
        from bitfold.calibration import calibrate, load_calibration, measure_sensitivity

        data = load_calibration(source, cfg, calib)
        if mixed is not None:
            from bitfold.allocation import allocate

            t = time.perf_counter()
            allocation = allocate(measure_sensitivity(data, spec, wide), spec, wide, mixed.bits_per_weight)
            allocation.seconds = time.perf_counter() - t
            print("\n".join(allocation.lines()), file=sys.stderr, flush=True)
            plan = FormatPlan(spec.name, allocation.overrides)
            with torch.device("meta"):
                skeleton = model_cls(cfg, torch.float32, max_positions=1, fmt=plan)
        if calib.method != "rtn":
            calibrated = calibrate(data, plan, calib)
        del data  # the float copy of the model
    tmp = tempfile.mkdtemp(prefix=".bitfold-quantize-", dir=parent)
    try:
        _write_tokenizer(source, tmp)
        stats = _write_weights(source, skeleton, str(plan), tmp, max_shard_bytes, dense_dtype, calibrated)
        head = skeleton.lm_head.fmt.spec.name  # a low-bit model always quantizes its output layer
        converted, calibrated_n = stats["converted"], stats["calibrated"]
        rounded = stats["linear_tensors"] - converted - calibrated_n
        counts = linear_formats(skeleton)
        qc = {"quant_method": "bitfold", "format": spec.name, "bits": spec.bits, "group_size": spec.group,
              "ternary": spec.ternary, "lm_head_format": head, "packing": "bitplanes-le",
              "method": "+".join(m for m, n in ((calib and calib.method, calibrated_n),
                                               ("rtn", rounded), ("gguf-blocks", converted)) if n),
              # decoder linears: codes + scales and mins, as stored (allocation.py's budget counts the same)
              "bits_per_weight": round(sum(b for _, b in counts.values()) / sum(n for n, _ in counts.values()), 4)}
        if plan.overrides:  # the loader's format per shard (hf.BitfoldQuantization); all shards of a merged linear
            qc["overrides"] = {f"model.layers.{i}.{shard}": f for (i, kind), f in plan.overrides.items()
                               for shard in MERGED_LINEARS[kind]}
        if rounded or calibrated_n:  # how the rounded tensors' ranges were chosen (see lowbit.quantize_rtn)
            qc["rounding"] = ROUNDINGS[0]
        if calibrated is not None:
            qc["calibration"] = {"method": calib.method, "corpus": calib.corpus, "samples": calib.samples,
                                 "length": calib.length, "seed": calib.seed, "damp": calib.damp,
                                 "act_order": calib.act_order, "seconds": round(calibrated.seconds, 1)}
        if allocation is not None:
            from bitfold.calibration import SENSITIVITY_TOKENS

            qc["allocation"] = {"upgrade_format": wide.name, "budget": mixed.bits_per_weight,
                                "upgraded": len(allocation.overrides), "linears": allocation.linears,
                                "sensitivity": "relative output error of rtn, float model, per extra bit",
                                "corpus": calib.corpus, "tokens": SENSITIVITY_TOKENS, "length": calib.length,
                                "seed": calib.seed, "seconds": round(allocation.seconds, 1)}
        config = _hf_config(source, model_cls.config_overrides, cfg)
        config["quantization_config"] = qc
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp and safetensors create private files
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
        os.replace(tmp, out)  # an empty `out` is replaced too
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = [f for f in os.listdir(out) if f.endswith(".safetensors")]
    stats.pop("calibrated")
    return QuantizeSummary(
        source=source.path, out=out, format=spec.name, head_format=head, layers=cfg.num_layers,
        method=calib.method if calibrated is not None else "rtn", allocation=allocation,
        files=len(files), disk_bytes=sum(os.path.getsize(os.path.join(out, f)) for f in files),
        seconds=time.perf_counter() - t0, **stats)


def _write_tokenizer(source, folder: str) -> None:
    if source.format == "gguf":
        source.load_tokenizer().save_hf(folder)  # checked by reading it back
        return
    if not os.path.isfile(os.path.join(source.path, "tokenizer.json")):
        print(f"[bitfold] {source.path} has no tokenizer.json; the quantized folder gets none either "
              "(token ids only)", file=sys.stderr)
    else:
        source.load_tokenizer()  # a broken tokenizer fails now, not after quantizing
    for name in TOKENIZER_FILES:
        path = os.path.join(source.path, name)
        if os.path.isfile(path):
            shutil.copy(path, os.path.join(folder, name))


def _linear_codes(name: str, weight, linear, shard: str, origin: str):
    """(q, scale, min, converted) for one linear weight, as Linear.load_shard would load it
    (round to nearest, or a GGUF block's codes)."""
    from bitfold.weights.packed import PackedWeight
    from bitfold.weights.lowbit import quantize_rtn

    rows = linear.shard_offsets[shard][1]
    if weight.shape[0] != rows or weight.shape[1] not in (linear.in_features, linear.in_padded):
        raise ModelLoadError(f"{origin}: tensor {name!r} has shape {tuple(weight.shape)}, expected "
                             f"({rows}, {linear.in_features})")
    spec = linear.fmt.spec
    if isinstance(weight, PackedWeight):
        codes = weight.codes(spec)
        if codes is not None:
            return (*codes, True)
        weight = weight.dequantize(linear.in_features)
    if weight.shape[1] != linear.in_features:
        raise ModelLoadError(f"{origin}: tensor {name!r} has shape {tuple(weight.shape)}, expected "
                             f"({rows}, {linear.in_features})")
    w = F.pad(weight.float(), (0, linear.in_padded - linear.in_features))  # as LowBitFormat.load
    return (*quantize_rtn(w, spec), False)


def _dense(weight, dense_dtype: str) -> torch.Tensor:
    from bitfold.weights.packed import as_float

    t = as_float(weight, weight.shape[-1])
    if dense_dtype != "auto":
        return t.to(DENSE_DTYPES[dense_dtype])
    if t.dtype == torch.float32:
        for narrow in (torch.float16, torch.bfloat16):  # only where every value survives
            n = t.to(narrow)
            if torch.equal(n.float(), t):
                return n
    return t


def _write_weights(source, skeleton, fmt: str, folder: str, max_shard_bytes: int, dense_dtype: str,
                   calibrated=None) -> dict:
    """Stream the source's weights into safetensors shards. `calibrated` (a CalibResult) supplies
    the codes of the linears it covers and the float tensors its folds changed."""
    from bitfold.layers.linear import Linear
    from bitfold.weights.packed import pack_bitplanes

    writer = _ShardWriter(folder, max_shard_bytes)
    todo = {(id(m), s) for m in skeleton.modules() if isinstance(m, Linear) for s in m.shard_offsets}
    stats = dict(linear_tensors=0, linear_params=0, linear_bytes=0, converted=0, calibrated=0, dense_tensors=0,
                 dense_params=0, dense_bytes=0, dense_dtypes={})
    codes = calibrated.codes if calibrated is not None else {}
    replaced = calibrated.dense if calibrated is not None else {}

    def add_linear(name: str, weight, linear: Linear, shard: str) -> None:
        if name in codes:
            q, s, m = codes[name]
            converted = False
            stats["calibrated"] += 1
        else:
            q, s, m, converted = _linear_codes(name, weight, linear, shard, source.path)
        tensors = {"qweight": pack_bitplanes(q, linear.fmt.spec.bits), "scales": s.half().contiguous(),
                   "mins": m.half().contiguous()}
        base = name.removesuffix(".weight")
        writer.add({f"{base}.{k}": t for k, t in tensors.items()})
        todo.discard((id(linear), shard))
        stats["linear_tensors"] += 1
        stats["linear_params"] += q.shape[0] * linear.in_features
        stats["linear_bytes"] += sum(t.numel() * t.element_size() for t in tensors.values())
        stats["converted"] += converted
        bar.update(1)

    with progress(len(todo), f"quantizing to {fmt}", unit="tensor", unit_scale=False) as bar:
        for name, weight in source.weights():
            target = skeleton.linear_for(name)
            if target is not None:
                add_linear(name, weight, *target)
            else:
                t = _dense(replaced.get(name, weight), dense_dtype)
                writer.add({name: t.contiguous()})
                stats["dense_tensors"] += 1
                stats["dense_params"] += t.numel()
                stats["dense_bytes"] += t.numel() * t.element_size()
                dtype = str(t.dtype).removeprefix("torch.")
                stats["dense_dtypes"][dtype] = stats["dense_dtypes"].get(dtype, 0) + 1
            if name == "model.embed_tokens.weight" and skeleton.tied_quantized_head:
                add_linear("lm_head.weight", weight, skeleton.lm_head, "lm_head")
    if todo:
        raise ModelLoadError(f"{source.path}: {len(todo)} linear weights are missing from the checkpoint")
    writer.finish()
    return stats


class _ShardWriter:
    """safetensors files of at most `max_bytes` (a tensor group is never split), named like
    transformers' (model.safetensors, or model-0000i-of-0000n.safetensors + index)."""

    def __init__(self, folder: str, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.current: dict[str, torch.Tensor] = {}
        self.size = 0
        self.shards: list[list[str]] = []
        self.total = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.current and self.size + nbytes > self.max_bytes:
            self._flush()
        self.current.update(tensors)
        self.size += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(self.current, self._path(len(self.shards)), metadata={"format": "pt"})
        self.shards.append(list(self.current))
        self.current, self.size = {}, 0

    def _path(self, i: int) -> str:
        return os.path.join(self.folder, f"model-{i + 1:05d}.safetensors.part")

    def finish(self) -> None:
        if self.current or not self.shards:
            self._flush()
        n = len(self.shards)
        if n == 1:
            os.replace(self._path(0), os.path.join(self.folder, "model.safetensors"))
            return
        weight_map = {}
        for i, names in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self._path(i), os.path.join(self.folder, final))
            weight_map.update(dict.fromkeys(names, final))
        with open(os.path.join(self.folder, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": self.total}, "weight_map": weight_map}, f, indent=2)
            f.write("\n")


def _hf_config(source, overrides: dict, cfg) -> dict:
    """An HF folder keeps its config.json; a GGUF's metadata is written as one, checked by
    reading it back into the same ModelConfig."""
    from bitfold.config import ModelConfig

    if source.format == "hf":
        with open(os.path.join(source.path, "config.json"), encoding="utf-8") as f:
            return json.load(f)
    arch = cfg.architecture  # the GGUF loader names the model class, which is registered under it
    config = {
        "architectures": [arch], "model_type": arch.removesuffix("ForCausalLM").lower(),
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling,
        "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias, "mlp_bias": cfg.mlp_bias,
        "sliding_window": cfg.sliding_window or None, "hidden_act": cfg.hidden_act, "torch_dtype": "float32",
    }
    back = replace(ModelConfig.from_hf(config, "config.json"), **overrides)
    if back != cfg:
        diff = [f"{k}={getattr(back, k)!r} (GGUF: {getattr(cfg, k)!r})" for k in vars(cfg)
                if getattr(back, k) != getattr(cfg, k)]
        raise BitfoldError(f"{source.path}: its configuration has no faithful config.json: it would read back "
                           f"as {', '.join(diff)}")
    return config

