#!/usr/bin/env bash
# GPU check for a lent NVIDIA machine (1x H200): versions, CUDA parity tests, one bench table.
#
#   scripts/gpu-check.sh            # from the repository root or anywhere
#
# Stays under 8 minutes (every stage has its own timeout). Runs from the source tree
# (PYTHONPATH), so no `pip install -e .` and no network is needed; it says what is missing.
# Without CUDA it reports that, runs a quick CPU sanity check and exits 0.
# Environment: PYTHON (interpreter), GPU_CHECK_OUT (output dir), GPU_CHECK_ENGINES
# (bench engines, default torch: ort/tensorrt add minutes of export per model),
# GPU_CHECK_CUDA_GRAPH (1: torch engine replays CUDA graphs, default 1), GPU_CHECK_DTYPE.
set -u
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
OUT=${GPU_CHECK_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")}
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" TQDM_DISABLE=1
STARTED=$SECONDS

# The first interpreter whose torch sees CUDA, else the first with torch at all.
PY=""
for candidate in "${PYTHON:-}" "$ROOT/.venv/bin/python" python3 python; do
    [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1 || continue
    if "$candidate" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' \
            2>/dev/null; then PY=$candidate; break; fi
    if [ -z "$PY" ] && "$candidate" -c 'import torch' 2>/dev/null; then PY=$candidate; fi
done
if [ -z "$PY" ]; then
    echo "No Python with torch found (tried \$PYTHON, .venv/bin/python, python3, python);"
    echo "install torch and this project: pip install -e '.[test]' (add [tensorrt] on NVIDIA)."
    exit 0
fi

stage() { echo; echo "== $1 ($((SECONDS - STARTED)) s elapsed)"; }
run() {  # run LIMIT_SECONDS CMD...: say when a stage fails or times out, then carry on
    local limit=$1; shift
    timeout --kill-after=5 "$limit" "$@"
    local rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then echo "!! timed out after ${limit} s: $*"
    elif [ $rc -ne 0 ]; then echo "!! exit code $rc: $*"; fi
    return $rc
}

stage "versions ($PY)"
"$PY" - <<'PYTHON'
import importlib.util, platform
import torch
print(f"python {platform.python_version()}, torch {torch.__version__}, "
      f"torch CUDA {torch.version.cuda}, cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    print(f"GPU: {torch.cuda.get_device_name()} (capability "
          "{}.{})".format(*torch.cuda.get_device_capability()))
try:
    import onnxruntime
    print(f"onnxruntime {onnxruntime.__version__}: {onnxruntime.get_available_providers()}")
except ImportError:
    print("onnxruntime: not installed")
try:
    import tensorrt
    print(f"tensorrt {tensorrt.__version__}")
except ImportError:
    print("tensorrt: not installed (pip install 'linear-export[tensorrt]' from NVIDIA's index)")
needed = ["onnx", "onnxscript", "onnxruntime", "polygraphy", "click", "numpy", "PIL",
          "safetensors", "tqdm", "scipy", "matplotlib", "pytest"]
missing = [name for name in needed if importlib.util.find_spec(name) is None]
print("missing packages: " + (", ".join(missing) + " (pip install -e '.[test]' needs network)"
                              if missing else "none"))
PYTHON

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    stage "CPU sanity check"
    echo "CUDA is absent: this torch sees no CUDA device, so the CUDA/TensorRT parity checks"
    echo "and the GPU benchmark are skipped (run this script on an NVIDIA GPU machine)."
    run 60 "$PY" -m linear_export generate --model GPT-tiny --image-size 24 --random-weights \
        --classes 1,2 --policy linear --budget 2lines --no-decode --out "$OUT/cpu-sanity" \
        && echo "CPU sanity check passed."
    echo "gpu-check done in $((SECONDS - STARTED)) s (CUDA absent; outputs in $OUT)."
    exit 0
fi

stage "parity on CUDA: tests/test_cuda.py, tests/test_tensorrt.py (torch, CUDA graph, ORT-CUDA, TensorRT)"
if "$PY" -c 'import pytest' 2>/dev/null; then
    run 130 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py tests/test_tensorrt.py
else
    echo "pytest is missing: parity tests skipped (pip install pytest)."
fi

stage "benchmark: GPT-B 256px and GPT-XL 384px, full / linear 1/4 / linear 1/6, batch 8 and 32"
DTYPE=${GPU_CHECK_DTYPE:-fp16}
GRAPH=()
[ "${GPU_CHECK_CUDA_GRAPH:-1}" = 1 ] && GRAPH=(--cuda-graph)
for spec in "GPT-B 256 110" "GPT-XL 384 180"; do
    set -- $spec
    run "$3" "$PY" -m linear_export bench --model "$1" --image-size "$2" --device cuda \
        --dtype "$DTYPE" --engines "${GPU_CHECK_ENGINES:-torch}" "${GRAPH[@]}" \
        --policies full,linear:1/4,linear:1/6 --batch-sizes 8,32 --repeats 1 \
        --warmup-steps 3 --out "$OUT/bench-$1" --force > "$OUT/bench-$1.log" 2>&1 \
        || tail -n 5 "$OUT/bench-$1.log"
done
echo
"$PY" "$ROOT/scripts/bench_table.py" "$OUT/bench-GPT-B" "$OUT/bench-GPT-XL"
echo
echo "gpu-check done in $((SECONDS - STARTED)) s; outputs in $OUT."
