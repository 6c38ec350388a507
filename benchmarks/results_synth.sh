#!/usr/bin/env bash
# The README's results table: every method trained and evaluated on the demo's synthetic benchmark.
#   bash benchmarks/results_synth.sh [EPOCHS] [METHODS...]      (default: 6 epochs per stage, all methods)
# Needs demo/cache (from `make demo`). Writes demo/results/<method>.json and prints one line per method.
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS=${1:-6}
shift || true
METHODS=${*:-baseline mgel han pma mia nafs}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p demo/results
for m in $METHODS; do
  run=demo/results/run-$m
  start=$(date +%s)
  [ -f "$run/checkpoints/best.pt" ] || .venv/bin/ped train --method "$m" --cache demo/cache --run "$run" \
      --epochs "$EPOCHS" --seed 0 --quiet $([ -d "$run" ] && echo --resume)
  trained=$(( $(date +%s) - start ))
  .venv/bin/ped eval --run "$run" --split test --out "demo/results/$m.json" > "demo/results/$m.txt"
  python3 - "$m" "$trained" "demo/results/$m.json" <<'PY'
import json, sys
m, secs, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
r = json.load(open(path))["t2i"]
print(f"| {m} | {secs} s | {r['R@1']:.1f} | {r['R@5']:.1f} | {r['R@10']:.1f} | {r['mAP']:.1f} |")
PY
done
