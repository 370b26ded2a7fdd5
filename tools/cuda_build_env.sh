# Sourced, with a Python that has a CUDA 13 build of torch: exports what building
# fused_optim's CUDA kernels here needs (../shared/CUDA_BUILD.md). Used by
# tools/check_cuda_build.sh and by CI's newest smoke lane (.ci/run).
#
#   source tools/cuda_build_env.sh PYTHON     (returns 1, saying why, if PYTHON's torch has no CUDA)
#
# The toolkit's root: the nvcc on PATH may be a wrapper from which torch would guess a root
# without libcudart. Headers such as cusparse.h come with the CUDA torch's nvidia wheels.
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$CUDA_HOME/bin:$PATH"
_fo_cuda_include=$("$1" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "include"))') ||
  { echo "cuda_build_env.sh: $1 has no CUDA build of torch (its nvidia packages are missing)" >&2; return 1; }
export CPATH="$_fo_cuda_include${CPATH:+:$CPATH}"
unset _fo_cuda_include
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-2}
