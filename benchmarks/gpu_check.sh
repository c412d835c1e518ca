#!/usr/bin/env bash
# The CUDA check of lwbench, in one go, on a machine with an NVIDIA GPU:
#   1. what is there: GPU name, driver, torch and CUDA versions (fails at once if torch sees no GPU: the gpu tests
#      would all be skipped and the check would pass while checking nothing);
#   2. every test marked `gpu` (tests/test_gpu.py and any other test file that uses pytest.mark.gpu);
#   3. one quick paired timing of three methods against `full` (benchmarks/latency_stability.py --quick), which
#      prints one summary table;
#   4. a slice of the speed reference at the paper's geometry on the GPU (lwbench speed: ViT-B/14-reg4 at 518 px,
#      batches 1 and 32, the merging methods through the folded proportional-attention bias, LookWhere, EViT),
#      written to $SPEED_OUT (default: a temporary folder), its table printed: the conversion users will see on CUDA.
# Every part runs even if an earlier one failed; the script exits non-zero if any part failed, and says which.
#
# On a fresh device machine, from the repository root:
#   python -m venv .venv && . .venv/bin/activate
#   pip install -c constraints.txt -e ".[dev]"
#   benchmarks/gpu_check.sh
# (CPU-only machines check the same CUDA paths with fakes in the default suite: tests/test_fake_cuda.py,
# tests/test_gpu_paths.py.)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python}"
# A cache of its own, unless the caller gives one: synthetic data and teachers are made afresh, nothing is reused.
export LWBENCH_CACHE="${LWBENCH_CACHE:-$(mktemp -d -t lwbench-gpu-check-XXXXXX)}"

echo "== environment"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
fi
"$PYTHON" - <<'EOF'
import sys

import torch

print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA device (a CPU-only torch wheel, or no driver): nothing to check")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability {p.major}.{p.minor}")
EOF

failed=()

echo "== gpu-marked tests"
mapfile -t gpu_tests < <( { echo tests/test_gpu.py; grep -lE "(pytest\.)?mark\.gpu" tests/test_*.py; } | sort -u)
echo "${gpu_tests[*]}"
if ! "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider -rs "${gpu_tests[@]}"; then
    failed+=("pytest -m gpu")
fi

echo "== paired timing, quick (benchmarks/latency_stability.py)"
if ! "$PYTHON" benchmarks/latency_stability.py --device cuda --quick; then
    failed+=("latency_stability.py --device cuda --quick")
fi

echo "== speed reference slice on CUDA (lwbench speed)"
SPEED_OUT="${SPEED_OUT:-$(mktemp -d -t lwbench-speed-XXXXXX)}"
if "$PYTHON" -m lwbench speed --device cuda --backbones vit_base_patch14_reg4_dinov2 --img-sizes 518 --batches 1,32 \
        --methods full,lookwhere,tome,pitome,mctf,evit,saint --set measure.min_runs=6 --limit-s 20 --quiet \
        --out "$SPEED_OUT"; then
    cat "$SPEED_OUT/table.md"
else
    failed+=("lwbench speed --device cuda")
fi

if ((${#failed[@]})); then
    printf 'gpu_check: FAILED: %s\n' "${failed[@]}" >&2
    exit 1
fi
echo "gpu_check: all parts passed"
