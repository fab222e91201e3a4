#!/usr/bin/env bash
# Every device figure from one run on a lent GPU, in under 8 minutes: `bench model`, `bench trainer`
# and `bench freshness` (2,000 and 4,000 events/s) with --device cuda, their JSON (and logs) in one folder.
#
#   bench/gpu.sh [OUT]        (or: make bench-gpu OUT=...)     default OUT: bench-gpu
#
# Needs a CUDA build of torch in the virtualenv (TGASTREAM=path/to/tgastream to use another
# install). Each step has its own time limit (190 + 60 + 110 + 110 s); a step that fails or runs out
# is reported and the others still run; the exit status is that of the first failure.
set -uo pipefail
OUT=${1:-bench-gpu}
TG=${TGASTREAM:-.venv/bin/tgastream}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "bench/gpu.sh: torch sees no CUDA device (a CPU build of torch, or no GPU): nothing measured" >&2
    exit 2
fi
"$PY" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))" | tee "$OUT/device.txt"
nvidia-smi >> "$OUT/device.txt" 2>&1 || true
status=0
step() {  # step NAME SECONDS ARGS...: one benchmark, its log and JSON in $OUT
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "== $name (limit ${limit}s): tgastream $*"
    timeout "$limit" "$TG" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "   $name: exit $rc after $((SECONDS - t0)) s (log: $OUT/$name.log)"
    tail -n 15 "$OUT/$name.log"
    if [ $rc -ne 0 ] && [ $status -eq 0 ]; then status=$rc; fi
}
step model 190 bench model --device cuda --lengths 50,200,1000,5000 --min-seconds 2 --json "$OUT/model.json"
step trainer 60 bench trainer --device cuda --ranks 1 --samples 8000 --json "$OUT/trainer.json"
step freshness 110 bench freshness --device cuda --rate 2000 --events 40000 --out "$OUT/freshness-run" \
    --json "$OUT/freshness.json"
step freshness-4000 110 bench freshness --device cuda --rate 4000 --events 60000 --out "$OUT/freshness-4000-run" \
    --json "$OUT/freshness-4000.json"
echo "bench/gpu.sh: JSON in $OUT: $(cd "$OUT" && ls *.json 2>/dev/null | tr '\n' ' ')"
exit $status
