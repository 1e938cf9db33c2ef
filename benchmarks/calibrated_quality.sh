#!/usr/bin/env bash
# Issue #12 part 4: rtn vs awq vs gptq quality with `bitfold eval ppl` on the CPU.
# usage: benchmarks/calibrated_quality.sh NAME MODEL|default "FORMATS" "METHODS" [eval flags...]
#   e.g. benchmarks/calibrated_quality.sh smollm2 default "int4-g64 int3-g64 int2-g64" "gptq awq" --windows 32
# Name formats with their group: on a 4-bit GGUF a bare `--weights int4` keeps the file's own
# blocks (no rounding at all), which is no round-to-nearest baseline.
# A format FMT@B is mixed precision: `bitfold quantize --format FMT --bits-per-weight B` (the
# default upgrade, one bit more), e.g. int3-g64@4.0; under it METHODS may include rtn (a
# checkpoint rounded to nearest with the calibration text's plan; plain formats get rtn at load).
# Writes calibrated checkpoints to $CKPT (default /tmp/bitfold-calib/NAME-METHOD-FORMAT), then one
# eval run over all of them in lockstep: fp32 dense (the reference: the checkpoint dequantized),
# int8 and every plain format rounded to nearest at load (rtn), and each calibrated checkpoint.
# $NO_INT8=1 leaves the int8 configuration out.
set -euo pipefail
name=$1 model=$2 formats=$3 methods=$4; shift 4
py=${PYTHON:-python}
ckpt=${CKPT:-/tmp/bitfold-calib}
calib=${CALIB:-}  # e.g. "--calib-samples 16"
modelflag=(); [ "$model" != default ] && modelflag=(--model "$model")
mkdir -p "$ckpt"
configs=(--config fp32:weights=dense)
[ -z "${NO_INT8:-}" ] && configs+=(--config rtn-int8:weights=int8)
for f in $formats; do
  fmt=${f%@*} label=${f/@/-bpw} mixed=()  # config names take no @
  if [ "$f" != "$fmt" ]; then
    mixed=(--bits-per-weight "${f#*@}")
  else
    configs+=(--config "rtn-$f:weights=$f")
  fi
  for m in $methods; do
    [ "$m" = rtn ] && [ ${#mixed[@]} -eq 0 ] && continue  # rtn of a plain format: at load, above
    out=$ckpt/$name-$m-$label
    if [ ! -e "$out/config.json" ]; then
      /usr/bin/time -f "quantize $m $f: %e s" $py -m bitfold.cli quantize "${modelflag[@]}" --format "$fmt" \
        "${mixed[@]}" --method "$m" $calib --out "$out"
    fi
    configs+=(--config "$m-$label:model=$out")
  done
done
$py -m bitfold.cli eval ppl "${modelflag[@]}" --device cpu "${configs[@]}" --no-progress --out benchmarks/results \
  --name "eval-ppl-$name-calibrated-$(date -u +%Y%m%d-%H%M%S)" "$@"
