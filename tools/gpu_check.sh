#!/usr/bin/env bash
# The CUDA checks to run on a machine with an NVIDIA GPU and a CUDA build of torch (issue 5),
# sized for a short device lease: builds the extension in place with its CUDA kernels, runs
# the CUDA tests, then the CUDA benchmark. A failing phase does not stop the later ones, so
# one run reports everything. Results go to $OUT (or ./gpu-check) as text files, seven at
# most (the device tool returns eight): log.txt (the GPU, torch, and each phase's exit
# status and seconds), build.txt, tests.txt (one line per test, written as each ends, so a
# run stopped at its time limit still says which passed), bench-stderr.txt and bench/'s
# bench.json, bench.md and summary.md.
#
#   bash tools/gpu_check.sh                      # everything (on an H200 machine with 16
#                                                # cores: tests 3 min for 2,325 of them
#                                                # on 2026-12-04, 2,707 now,
#                                                # benchmark 80 s, + a build of some minutes)
#   GPU_CHECK_BENCH=0 bash tools/gpu_check.sh    # no benchmark
#   GPU_CHECK_TESTS=0 bash tools/gpu_check.sh    # no tests (the benchmark as a second call)
#   GPU_CHECK_BUILD=0 bash tools/gpu_check.sh    # use the CUDA build already in place
#                                                # (built for this torch, e.g. elsewhere)
# Sized for a lease of 15 minutes of device time: a first call with GPU_CHECK_BENCH=0 (and
# the run tool's timeout_s near 560), then, at once, GPU_CHECK_BUILD=0 GPU_CHECK_TESTS=0.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
: > "$OUT/log.txt"
PY=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the in-place build, for bench.py too
export FUSED_OPTIM_CUDA=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
status=0
phase() {  # phase NAME COMMAND...: runs it, logs its exit status and time
  local name=$1 start=$SECONDS rc
  shift
  echo "== $name"
  "$@"
  rc=$?
  echo "$name: exit $rc, $((SECONDS - start)) s" | tee -a "$OUT/log.txt"
  [ "$rc" -eq 0 ] || status=1
  return "$rc"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "CUDA", torch.version.cuda)'
} 2>&1 | tee -a "$OUT/log.txt"

cuda_build_loads() { "$PY" tools/check_cuda_registrations.py; }
build() {
  # Where the toolkit's standard root is there, the headers and paths of CI's CUDA build
  # (tools/cuda_build_env.sh: the nvcc on PATH may be a wrapper from which torch would
  # guess a root without libcudart; cusparse.h and others come with the nvidia wheels);
  # else torch's own search. The paths go to build.txt first: a build that fails late
  # says what it used.
  if [ -x /usr/local/cuda/bin/nvcc ]; then
    # shellcheck source=cuda_build_env.sh
    source tools/cuda_build_env.sh "$PY" || echo "(tools/cuda_build_env.sh failed: torch's own search)"
  fi
  { echo "CUDA_HOME=${CUDA_HOME:-unset} CPATH=${CPATH:-unset} nvcc=$(command -v nvcc)"
    "$PY" -c 'from torch.utils import cpp_extension as c; print("torch finds CUDA_HOME =", c.CUDA_HOME)'
  } > "$OUT/build.txt" 2>&1
  timeout -k 30 "${GPU_CHECK_BUILD_TIMEOUT:-420}" "$PY" setup.py -q build_ext --inplace \
    >> "$OUT/build.txt" 2>&1 || { tail -40 "$OUT/build.txt"; return 1; }
}

if [ "${GPU_CHECK_BUILD:-1}" = "0" ] && cuda_build_loads; then
  echo "using the CUDA build in place"
else
  [ "${GPU_CHECK_BUILD:-1}" = "0" ] && echo "GPU_CHECK_BUILD=0, but the build in place does not load: building" | tee -a "$OUT/log.txt"
  phase "build (arch $TORCH_CUDA_ARCH_LIST, $MAX_JOBS jobs)" build || exit 1
  phase "load" cuda_build_loads || exit 1
fi

# The whole CUDA suite; in parallel processes where pytest-xdist is installed. A hung
# kernel fails its test (pytest-timeout) instead of eating the lease.
# Each worker on one CPU thread: 8 workers of 16 OpenMP threads each made the CPU halves
# of the tests (the references) 30x slower on a 16-core machine.
xdist=()
"$PY" -c 'import xdist' 2> /dev/null && xdist=(-n "${GPU_CHECK_WORKERS:-12}")
timeout_arg=()
# (the thread method: a test blocked in a CUDA call never sees a signal)
"$PY" -c 'import pytest_timeout' 2> /dev/null && timeout_arg=(--timeout 150 --timeout-method=thread)
if [ "${GPU_CHECK_TESTS:-1}" != "0" ]; then
  phase "CUDA tests" timeout -k 30 "${GPU_CHECK_TESTS_TIMEOUT:-330}" \
    env OMP_NUM_THREADS="${OMP_NUM_THREADS:-$([ ${#xdist[@]} -gt 0 ] && echo 1 || nproc)}" "$PY" -m pytest tests/test_cuda.py tests/test_fast_path.py -v -p no:cacheprovider \
    -rfEs --tb=short --durations=10 ${xdist[@]+"${xdist[@]}"} ${timeout_arg[@]+"${timeout_arg[@]}"} \
    > "$OUT/tests.txt" 2>&1
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.txt" | tail -25
fi

if [ "${GPU_CHECK_BENCH:-1}" != "0" ]; then
  # W1/W2 are the issue's bandwidth targets (90% of the copy bandwidth), W3 its launch
  # target (faster than torch's fused CUDA path). stderr is the progress bar, and the
  # errors and notes (a row left out, a refusal): kept in a file, its end shown on failure.
  phase "benchmark --device cuda" timeout -k 30 "${GPU_CHECK_BENCH_TIMEOUT:-240}" \
    "$PY" benchmarks/bench.py --device cuda --workloads W1,W2,W3,W4 --algos Adam,AdamW,SGD \
    --impls "fused_optim,torch foreach=True,torch fused=True" --steps 30 --out "$OUT/bench" \
    2> "$OUT/bench-stderr.txt" \
    || { tr '\r' '\n' < "$OUT/bench-stderr.txt" | grep -v '^\[#*\.*\]' | tail -20; status=1; }
  rm -f "$OUT/bench/bench.png"  # (the device tool returns eight files; the tables say it all)
fi
exit "$status"
