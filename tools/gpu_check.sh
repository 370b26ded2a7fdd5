#!/usr/bin/env bash
# The CUDA checks to run on a machine with an NVIDIA GPU and a CUDA build of torch (issue 5),
# sized for a short device lease: builds the extension in place with its CUDA kernels,
# runs the CUDA tests (a smoke subset first, so that a broken build fails in seconds), then
# the CUDA benchmark. Results go to $OUT (or ./gpu-check) as text files.
#
#   bash tools/gpu_check.sh            # everything (about 6 to 10 minutes on an H100)
#   GPU_CHECK_BENCH=0 bash tools/gpu_check.sh   # tests only
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
export FUSED_OPTIM_CUDA=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$(python -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)' | tee -a "$OUT/gpu.txt"

echo "== build (FUSED_OPTIM_CUDA=1, arch $TORCH_CUDA_ARCH_LIST)"
if ! python setup.py -q build_ext --inplace > "$OUT/build.txt" 2>&1; then
  tail -40 "$OUT/build.txt"
  exit 1
fi

echo "== first the tests of one case each (launches, scalars, graphs, GradScaler, ...)"
python -m pytest tests/test_cuda.py -q -x -p no:cacheprovider \
  -k "not (bitwise_equal_to_cpu or for_loop_on_cuda)" \
  2>&1 | tail -30 | tee "$OUT/tests_smoke.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 1

echo "== the whole CUDA suite"
python -m pytest tests/test_cuda.py tests/test_fast_path.py -q -p no:cacheprovider -rfs 2>&1 | tail -60 | tee "$OUT/tests.txt"
status=${PIPESTATUS[0]}

if [ "${GPU_CHECK_BENCH:-1}" != "0" ]; then
  echo "== benchmark --device cuda"
  python benchmarks/bench.py --device cuda --workloads W1,W2,W3,W4 --algos Adam,AdamW,SGD \
    --impls "fused_optim,torch foreach=True,torch fused=True" --steps 20 --out "$OUT/bench" \
    2> /dev/null | tee "$OUT/bench.md"
fi
exit "$status"
