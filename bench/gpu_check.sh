#!/usr/bin/env bash
# The GPU checks in one go, for a machine with a CUDA device:
#   1. the `cuda`-marked tests (tests/gpu/): pinned memory and non-blocking copies, one sync per
#      batch, bf16/fp16 answers against float32 on the easy-VQA test split, a real out-of-memory
#      split (allocator capped with torch.cuda.set_per_process_memory_fraction), cudnn.benchmark
#      warm-up covering every live batch size;
#   2. the GPU benchmark (vqa-bench --device cuda), its results JSON and the rendered
#      docs/performance.md section written to the output folder.
#
#   bench/gpu_check.sh [--out DIR] [--quick] [--skip-bench]   # on the GPU machine
#   bench/gpu_check.sh --dry-run [--out DIR]                  # anywhere (the test suite runs it)
#
# --dry-run runs the same steps on the CPU so that this script cannot rot: it lists every GPU
# check with what it checks, runs them (pytest skips each, saying why), and runs the benchmark
# command with a tiny CPU configuration. It says what it would check on a GPU.
#
# Needs: python3 (3.10+; $PYTHON to choose) with torch -- a CUDA build for the real run -- and
# the project's other dependencies importable: safetensors, numpy, pillow, torchvision, pytest;
# for the benchmark also fastapi, fastapi-offline, uvicorn, python-multipart, pydantic-settings,
# prometheus-client, httpx, httptools; easy-vqa for the precision check (it skips without it). No
# internet: nothing is downloaded. The project runs from this tree (PYTHONPATH), nothing is
# installed; on a machine without the dependencies, install the wheels you brought with
# `pip install --no-deps <wheels>` and the project with `pip install --no-deps -e .`. The script
# lists what is missing before it starts, and each step says whether it passed.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
OUT_DIR="${OUT:-$ROOT/gpu-check-results}"
DRY=0
QUICK=0
BENCH=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --quick) QUICK=1 ;;
    --skip-bench) BENCH=0 ;;
    --out) OUT_DIR="$2"; shift ;;
    -h|--help) sed -n '2,27p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
declare -a SUMMARY=()
FAILED=0
step() { echo; echo "=== $* ==="; }
result() {  # result NAME RC
  if [[ "$2" == 0 ]]; then SUMMARY+=("PASS  $1"); else SUMMARY+=("FAIL  $1 (exit $2)"); FAILED=1; fi
}

step "environment"
"$PYTHON" - <<'EOF' | tee "$OUT_DIR/environment.txt"
import platform, sys
print("python", sys.version.split()[0], platform.platform())
try:
    import torch
except ImportError:
    sys.exit("torch is not importable: nothing can run")
print("torch", torch.__version__, "cuda build", torch.version.cuda)
print("cuda available", torch.cuda.is_available())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"device {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, bf16 {torch.cuda.is_bf16_supported()}")
EOF
[[ ${PIPESTATUS[0]} == 0 ]] || exit 1

CUDA_OK="$("$PYTHON" -c 'import torch; print(int(torch.cuda.is_available()))')"
if [[ "$DRY" == 0 && "$CUDA_OK" != 1 ]]; then
  echo "no CUDA device visible: run with --dry-run to check the script itself" >&2
  exit 1
fi
if [[ "$DRY" == 1 ]]; then
  echo "DRY RUN on the CPU: the GPU checks are listed and skipped, the benchmark runs a tiny CPU configuration"
fi

step "dependencies"
"$PYTHON" - <<'EOF' | tee "$OUT_DIR/dependencies.txt"
import importlib.util
need = {"tests": ["torch", "torchvision", "safetensors", "numpy", "PIL", "pytest"],
        "precision check": ["easy_vqa"],
        "benchmark": ["fastapi", "fastapi_offline", "uvicorn", "multipart", "pydantic_settings",
                      "prometheus_client", "httpx", "httptools"]}
for what, mods in need.items():
    missing = [m for m in mods if importlib.util.find_spec(m) is None]
    print(f"{what}: " + ("all present" if not missing else "MISSING " + ", ".join(missing)))
EOF

step "what the GPU checks check (tests/gpu, marker cuda)"
"$PYTHON" - <<'EOF' | tee "$OUT_DIR/checks.txt"
import inspect
import tests.gpu.test_cuda as m
for name, fn in inspect.getmembers(m, inspect.isfunction):
    if name.startswith("test_"):
        doc = " ".join((fn.__doc__ or "").split())
        print(f"- {name}: {doc}")
EOF
result "list the GPU checks" "${PIPESTATUS[0]}"

step "GPU checks: pytest -m cuda tests/gpu"
"$PYTHON" -m pytest -m cuda tests/gpu -v -rs -s -p no:cacheprovider --junitxml="$OUT_DIR/cuda-tests.xml" \
  2>&1 | tee "$OUT_DIR/cuda-tests.log"
rc=${PIPESTATUS[0]}
if [[ "$DRY" == 1 ]]; then
  # On the CPU every check must be collected and skipped with its reason, none run.
  if [[ $rc == 0 ]] && grep -q "skipped" "$OUT_DIR/cuda-tests.log" && ! grep -Eq "[0-9]+ passed" "$OUT_DIR/cuda-tests.log"; then
    result "GPU checks collected and skipped on the CPU" 0
  else
    result "GPU checks collected and skipped on the CPU" 1
  fi
else
  if grep -q "SKIPPED" "$OUT_DIR/cuda-tests.log"; then echo "note: some GPU checks were skipped (see above)"; fi
  result "GPU checks" "$rc"
fi

if [[ "$BENCH" == 1 ]]; then
  cp "$ROOT/docs/performance.md" "$OUT_DIR/performance.md"
  if [[ "$DRY" == 1 ]]; then
    step "benchmark (dry run: compact regime, concurrency 1, a few requests, CPU)"
    args=(--device cpu --quick --regimes compact --concurrency 1 --requests 4 --rounds 1
          --ceiling-seconds 0.05 --healthz-requests 10 --label "bench/gpu_check.sh dry run (CPU)"
          --output "$OUT_DIR/cpu-dry-run.json" --doc "$OUT_DIR/performance.md")
  else
    step "GPU benchmark"
    args=(--device cuda --concurrency 1,8,32,64,128 --ceiling-batch-sizes 1,8,32,64,128
          --output "$OUT_DIR/cuda.json" --doc "$OUT_DIR/performance.md")
    if [[ "$QUICK" == 1 ]]; then args+=(--quick); else args+=(--requests 1024 --rounds 8); fi
  fi
  echo "$PYTHON -m bench.run ${args[*]}"
  "$PYTHON" -m bench.run "${args[@]}" 2>&1 | tee "$OUT_DIR/bench.log"
  result "benchmark ($([[ $DRY == 1 ]] && echo 'CPU dry run' || echo 'GPU'))" "${PIPESTATUS[0]}"
fi

step "summary"
for line in "${SUMMARY[@]}"; do echo "$line"; done
if [[ "$DRY" == 1 ]]; then
  echo "DRY RUN: nothing was checked on a GPU. On a GPU machine, without --dry-run, this runs the checks listed above"
  echo "and the GPU benchmark (bench/results/cuda.json and the docs/performance.md GPU section, written to $OUT_DIR)."
else
  echo "results in $OUT_DIR: commit cuda.json as bench/results/cuda.json and the GPU section of performance.md"
fi
exit $FAILED
