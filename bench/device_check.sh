#!/usr/bin/env bash
# One prepared run for a machine with a GPU: full-size synthetic SD1 models, the per-method CPU/GPU agreement check
# (bench/gpu_check.py, each method against its bound in docs/performance.md) and the scaling table with a cuda
# column (bench/bench_scaling.py). Results go to $OUT (or bench/results/), one file each.
#
#   bash bench/device_check.sh            # from the repository root; uses .venv/bin/python if present
#   FACTOR=4 GM_ITERATIONS=5 bash bench/device_check.sh   # a quicker, smaller run
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
RESULTS=${OUT:-bench/results}
WORK=${WORKDIR:-bench/work}
FACTOR=${FACTOR:-1}
mkdir -p "$RESULTS" "$WORK"
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(uname -a)"
  nproc | sed 's/^/cores: /'
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
} > "$RESULTS/machine.txt" 2>&1
cat "$RESULTS/machine.txt"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check here')"

echo "== gpu_check (every method, cuda vs cpu, against its bound)"
status=0
"$PY" bench/gpu_check.py --factor "${GPU_CHECK_FACTOR:-16}" | tee "$RESULTS/gpu_check.txt" || status=$?

echo "== scaling table (factor $FACTOR)"
"$PY" bench/bench_scaling.py --factor "$FACTOR" --workdir "$WORK" --gm-iterations "${GM_ITERATIONS:-10}" \
  --out "$RESULTS/scaling.md" | tee "$RESULTS/scaling.log"
echo "results in $RESULTS (gpu_check exit $status)"
exit $status
