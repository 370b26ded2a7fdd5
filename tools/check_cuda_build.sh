#!/usr/bin/env bash
# Compiles and links fused_optim with its CUDA kernels on a machine without a GPU, and
# checks that the kernels were registered (issue 5: the CUDA sources must compile with the
# installed nvcc against torch's headers). Nothing here runs a kernel.
#
#   bash tools/check_cuda_build.sh [VENV]
#
# VENV (default ../cuda-venv) is a virtual environment with a CUDA build of torch; it is
# created when missing (torch==2.14.1, the CUDA 13 build this project's machines have on
# disk: about 5.5 GB, outside the repository). The build happens in a temporary copy of the
# tracked files, so the working tree's own (CPU) build is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(realpath -m "${1:-../cuda-venv}")  # (absolute: the build below runs elsewhere)
TORCH_CUDA=${FUSED_OPTIM_CUDA_TORCH:-torch==2.14.1}
if ! "$VENV/bin/python" -c 'import torch, sys; sys.exit(torch.version.cuda is None)' 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "$TORCH_CUDA" numpy ninja setuptools wheel
fi
source tools/cuda_build_env.sh "$VENV/bin/python"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$WORK"
cd "$WORK"
echo "== building with FUSED_OPTIM_CUDA=1 (nvcc $(nvcc --version | tail -1), arch $TORCH_CUDA_ARCH_LIST)"
# (The CPU loops for the x86-64 baseline only: the CPU builds check the others, and this
# build then takes minutes less.)
FUSED_OPTIM_CUDA=1 FUSED_OPTIM_ISA_COPIES=baseline "$VENV/bin/python" setup.py -q build_ext --inplace
echo "== checking the CUDA registrations"
"$VENV/bin/python" tools/check_cuda_registrations.py
