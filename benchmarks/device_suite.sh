#!/usr/bin/env bash
# The device suite: what a GPU (or TPU) session runs once, in under 8 minutes, appending its figures to
# benchmarks/RESULTS.md with the card's name, the date and the revision.
#   1. train step of `small` at L=1024, bf16, cuDNN attention, layer scan, remat none / dots_saveable / full:
#      tokens/s and MFU against the device's peak (benchmarks/device_step.py);
#   2. the same for `medium` (batch 8); BD3-LM `small` (2L input) with XLA's dense attention and with the
#      block-sparse Pallas kernel (attention_impl='pallas'), remat none;
#   3. memory_analysis of small / medium / 1b and the largest batch per device in 80 GB (benchmarks/memory.py);
#   4. the cost of one cached decoder call vs tokens per call, k = 1..64, small / medium / 1b, batch 1 and 8
#      (benchmarks/call_cost.py: is a call of 16-64 tokens as cheap as one of 1 on this device?);
#   5. speed at matched quality on the trained issue-27 models (benchmarks/speed_quality.py --device-suite), when
#      their checkpoints are here: $SQ_ROOT (default runs) holding sq_* and judge. To carry them (the runs are
#      ~200 MB, over carry's 64 MiB): `python benchmarks/speed_quality.py --export=sq_carry` (the newest step of
#      each, ~59 MiB), carry sq_carry, run with SQ_ROOT=sq_carry;
#   6. the decoding speed table (benchmarks/decode_speed.py, KV-cache samplers), with what is left of the budget.
#
#   bash benchmarks/device_suite.sh             # on the device; appends to benchmarks/RESULTS.md
#   bash benchmarks/device_suite.sh --dry-run   # CPU: tiny sizes, traces and compiles every part (~minutes),
#                                               # prints the section but does not touch RESULTS.md
# On an image without ml-collections / grain / tensorflow-datasets / tensorboardX / portpicker (the H200 image
# of 2026-11), carry them as wheels and install them first: benchmarks/RESULTS.md, "GPU spot checks".
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
OUT=$(mktemp)
T0=$(date +%s)
device=$($PY -c "import jax; d = jax.devices()[0]; print(f'{jax.device_count()} x {d.device_kind} ({d.platform})')")
{
  echo
  echo "## Device suite (\`bash benchmarks/device_suite.sh\`$([ $DRY = 1 ] && echo ' --dry-run'), $(date -u +%Y-%m-%d), $device, revision $(git rev-parse --short HEAD 2>/dev/null || echo '?'))"
} | tee -a "$OUT"
if [ $DRY = 1 ]; then
  $PY benchmarks/device_step.py --dry-run | tee -a "$OUT"
  $PY benchmarks/device_step.py --dry-run --experiment=bd3lm --attention=pallas_interpret | tee -a "$OUT"
  $PY benchmarks/memory.py --presets=tiny --seq=64 --batches=4,8 --remat=full --dtype=float32 | tee -a "$OUT"
  $PY benchmarks/call_cost.py --dry-run | tee -a "$OUT"
  $PY benchmarks/speed_quality.py --dry-run --only=sub-blocks | tee -a "$OUT"
  $PY benchmarks/decode_speed.py --dry-run | tee -a "$OUT"
else
  timeout 200 $PY benchmarks/device_step.py --preset=small --seq=1024 --batch=16 --budget_s=150 | tee -a "$OUT" || echo "(small: timed out or failed)" | tee -a "$OUT"
  timeout 120 $PY benchmarks/device_step.py --preset=medium --seq=1024 --batch=8 --remat=dots_saveable,full --budget_s=80 | tee -a "$OUT" || echo "(medium: timed out or failed)" | tee -a "$OUT"
  for impl in xla pallas; do
    timeout 75 $PY benchmarks/device_step.py --experiment=bd3lm --attention=$impl --preset=small --seq=1024 --batch=8 --remat=none --steps=5 | tee -a "$OUT" || echo "(bd3lm $impl: timed out or failed)" | tee -a "$OUT"
  done
  timeout 60 $PY benchmarks/memory.py --presets=small,medium,1b --remat=full --seq=1024 | tee -a "$OUT" || echo "(memory: timed out or failed)" | tee -a "$OUT"
  timeout 120 $PY benchmarks/call_cost.py --sizes=small,medium,1b --repeats=3 | tee -a "$OUT" || echo "(call cost: timed out or failed)" | tee -a "$OUT"
  SQ_ROOT=${SQ_ROOT:-runs}
  if [ -d "$SQ_ROOT/sq_ar/checkpoints" ] && [ -d "$SQ_ROOT/judge/checkpoints" ]; then
    timeout 200 $PY benchmarks/speed_quality.py --device-suite --root="$SQ_ROOT" --out=/tmp/speed_quality_device.png | grep -v "^  " | tee -a "$OUT" || echo "(speed_quality: timed out or failed)" | tee -a "$OUT"
  else
    echo "(speed_quality: no $SQ_ROOT/sq_* and $SQ_ROOT/judge checkpoints here)" | tee -a "$OUT"
  fi
  remaining=$(( 450 - ($(date +%s) - T0) ))
  if [ $remaining -gt 30 ]; then
    timeout $remaining $PY benchmarks/decode_speed.py --size=small --vocab=50258 --repeats=2 --lengths=1024,256 --budget_s=$((remaining - 20)) | tee -a "$OUT" || echo "(decoding: timed out or failed)" | tee -a "$OUT"
  fi
fi
echo "suite wall time: $(( $(date +%s) - T0 )) s" | tee -a "$OUT"
if [ $DRY = 0 ]; then
  cat "$OUT" >> benchmarks/RESULTS.md
  echo "appended to benchmarks/RESULTS.md"
fi
rm -f "$OUT"
