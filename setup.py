"""Build fused_optim's C++ (and optional CUDA) kernels as one torch extension, `fused_optim._C`.

Build it against the torch that is installed, never an isolated one:

    pip install --no-build-isolation -e .

FUSED_OPTIM_CUDA=auto|0|1 decides whether the CUDA kernels are compiled: `auto` (default)
builds them when a CUDA build of torch and a CUDA toolkit of the same major version are
present, and otherwise builds for the CPU (with a warning where torch is a CUDA build);
`1` makes "cannot" an error. It never depends on whether a GPU is visible at build time.
An unsupported torch or Python, or no C++ compiler, stops the build with a message that
says what to do (fused_optim/_support.py has the supported releases); the environment
is left as it was: torch is not a declared dependency, so pip never replaces it.
"""
import glob
import os
import re
import runpy
import shutil
import subprocess
import sys
import warnings

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
# The supported torch and Python releases (one place, shared with the import-time check).
SUPPORT = runpy.run_path(os.path.join(HERE, "fused_optim", "_support.py"))


def fail(message: str):
    """Stops the build with `message`: nothing is installed, nothing in the environment changes."""
    sys.exit(message if message.startswith("fused_optim") else "fused_optim: " + message)


def check_python():
    error, warning = SUPPORT["python_problem"](sys.version_info)
    if error:
        fail(error)
    if warning:
        warnings.warn(warning)


def check_compiler():
    """A C++20 compiler is needed (g++ >= 10 or clang >= 14): say so before torch's
    extension builder fails deep inside a compile."""
    if sys.platform == "win32":
        return
    cxx = os.environ.get("CXX", "c++").split()[0]
    if shutil.which(cxx) is None:
        fail(f"building needs a C++20 compiler (g++ >= 10 or clang >= 14), and `{cxx}` is not "
             "on PATH. Install one (Debian/Ubuntu: `apt-get install g++`; conda: "
             "`conda install gxx_linux-64`), or name it in CXX, and install again.")
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
        version = subprocess.run([cxx, "-dumpfullversion", "-dumpversion"], capture_output=True,
                                 text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return
    if "Free Software Foundation" in out and version and int(version.split(".")[0]) < 10:
        fail(f"building needs a C++20 compiler: g++ >= 10, and `{cxx}` is g++ {version}. "
             "Install a newer one and name it in CXX (e.g. `CXX=g++-12`), then install again.")


def check_setuptools():
    """pyproject.toml gives the license as an SPDX expression, which setuptools reads from
    77 on; an older one stops with a schema error about `project.license`: say what to do."""
    import setuptools

    version = getattr(setuptools, "__version__", "0")
    match = re.match(r"(\d+)", version)
    if match and int(match.group(1)) < 77:
        fail(f"building needs setuptools 77 or later, and this environment has setuptools "
             f"{version}. Run `pip install \"setuptools>=77\"`, then install again.")


check_python()
check_compiler()
check_setuptools()
try:
    import torch
except ImportError:
    fail(
        "building needs PyTorch installed in this environment, and pip must not build in an "
        "isolated environment. Install torch first (e.g. `pip install torch==2.13.0`), then "
        "`pip install --no-build-isolation -e .` (the flag is what lets the build see it)."
    )
_torch_error, _torch_warning = SUPPORT["torch_problem"](torch.__version__)
if _torch_error:
    fail(_torch_error)
if _torch_warning:
    warnings.warn(_torch_warning)
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME, BuildExtension, CppExtension, CUDAExtension)


def toolkit_version():
    """(major, minor) of the CUDA toolkit at CUDA_HOME, from its nvcc; None if it can't tell."""
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc")
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def cuda_problem():
    """Why the CUDA kernels cannot be built here, or None."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if CUDA_HOME is None:
        return "no CUDA toolkit was found (set CUDA_HOME to its root, e.g. /usr/local/cuda)"
    toolkit = toolkit_version()
    if toolkit is None:
        return f"the CUDA toolkit at {CUDA_HOME} has no working nvcc"
    torch_major = int(torch.version.cuda.split(".")[0])
    if toolkit[0] != torch_major:
        # torch's extension builder refuses a different major version (minor ones work).
        return (f"the CUDA toolkit at {CUDA_HOME} is CUDA {toolkit[0]}.{toolkit[1]}, but torch "
                f"{torch.__version__} was built with CUDA {torch.version.cuda}; install a "
                f"CUDA {torch_major}.x toolkit and point CUDA_HOME at it, or a torch built "
                f"for CUDA {toolkit[0]}")
    return None


def want_cuda():
    """(build the CUDA kernels?, why not). FUSED_OPTIM_CUDA=auto builds them where they can
    be built, else builds for the CPU with a warning; 1 makes 'cannot' an error; 0 skips."""
    mode = os.environ.get("FUSED_OPTIM_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        fail(f"FUSED_OPTIM_CUDA must be auto, 0 or 1, not {mode!r}")
    if mode == "0":
        return False, "the build was made with FUSED_OPTIM_CUDA=0"
    problem = cuda_problem()
    if problem is None:
        return True, None
    if mode == "1":
        fail(f"FUSED_OPTIM_CUDA=1, but the CUDA kernels cannot be built: {problem}.")
    if torch.version.cuda is not None:
        # A CUDA torch without a matching toolkit: the user may well expect CUDA kernels.
        warnings.warn(f"fused_optim: building without the CUDA kernels: {problem}. CPU params "
                      "work; for CUDA params rebuild with a matching toolkit "
                      "(FUSED_OPTIM_CUDA=1 makes this an error).")
    return False, problem


def cuda_big_kernel_args() -> bool:
    """Note [CUDA launches] in csrc/cuda/multi_tensor.cuh: a launch's tensors travel in a
    kernel argument of up to 32 KB where CUDA >= 12.1 (checked there) and every target
    architecture is Volta (7.0) or newer; ptxas holds older ones to 4 KB."""
    from torch.utils.cpp_extension import _get_cuda_arch_flags

    try:
        flags = _get_cuda_arch_flags()
    except Exception:  # no arch list and no GPU to ask: the build reports it
        return False
    archs = [int(a) for f in flags for a in re.findall(r"(?:sm|compute)_(\d+)", f)]
    return bool(archs) and min(archs) >= 70


def write_build_info(with_cuda: bool, why_no_cuda, package_dir: str) -> None:
    # Read by fused_optim/__init__.py before loading _C, so a torch upgrade after the
    # build gives a clear "rebuild" message instead of an undefined-symbol trace.
    os.makedirs(package_dir, exist_ok=True)
    with open(os.path.join(package_dir, "_build_info.py"), "w") as f:
        f.write("# Generated by setup.py. Do not edit.\n")
        f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
        f.write(f"WITH_CUDA = {with_cuda!r}\n")
        f.write(f"WHY_NO_CUDA = {why_no_cuda!r}\n")


def openmp_flags():
    """at::parallel_for is a header template: under torch's OpenMP backend it only runs in
    parallel in code compiled with OpenMP; without it every call silently runs on one thread.
    Linking libgomp.so.1 shares the OpenMP runtime torch has already loaded (same soname), so
    torch.set_num_threads keeps governing our loops."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return [], []  # the native backend's thread pool lives in libtorch: nothing to add
    if sys.platform == "win32":
        return ["/openmp"], []
    if sys.platform == "darwin":
        return ["-Xpreprocessor", "-fopenmp"], ["-lomp"]
    return ["-fopenmp"], ["-fopenmp"]


class BuildExt(BuildExtension):
    """torch's builder, with two guarantees that the import's "rebuild" check rests on:

    * every build compiles: distutils skips an extension whose output looks newer than its
      sources, and torch's builder forces the compile only where ninja drives it; without
      ninja, a rebuild after a torch upgrade (or with FUSED_OPTIM_CUDA=1) reused the old
      library;
    * fused_optim/_build_info.py (the torch it was built against, and whether it has CUDA
      kernels) is written once the library is built, so a failed or interrupted build, or a
      setup.py command that builds nothing, leaves the record of the library that is there.
    """

    def finalize_options(self):
        super().finalize_options()
        self.force = True

    def run(self):
        super().run()
        for ext in self.extensions:
            info = getattr(ext, "fused_optim_build_info", None)
            if info is None:
                continue
            write_build_info(*info, package_dir=os.path.join(HERE, "fused_optim"))
            if not self.inplace:  # (the wheel's copy, which build_py made from the tree's)
                write_build_info(*info, package_dir=os.path.join(self.build_lib, "fused_optim"))


def extensions():
    with_cuda, why_no_cuda = want_cuda()
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx_flags = [
        "-O3",
        # The sources are C++20 (template lambdas). torch's extension builder adds
        # -std=c++17 where no -std is given (torch 2.8 does), and GCC then accepts them as an
        # extension only; clang does not.
        "-std=c++20",
        # Note [no FP contraction]: the kernels spell out every fused multiply-add they
        # want (std::fma), exactly where torch's own kernels use one. Letting the compiler
        # contract other a*b+c would make results depend on the vector width and differ
        # from torch.optim's for-loop.
        "-ffp-contract=off",
        # sqrt without errno handling, so loops with sqrt vectorize; results unchanged.
        "-fno-math-errno",
        "-fvisibility=hidden",
        # Note [vector rules]: the update rules also run on AVX2/AVX-512 vector types,
        # inside loops compiled for those ISAs; GCC notes that passing such a vector to a
        # function of another ISA changes its ABI. No such call is left after inlining,
        # and none crosses the library's interface.
        "-Wno-psabi",
    ]
    ext_cls = CppExtension
    kwargs = {}
    if with_cuda:
        ext_cls = CUDAExtension
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        kwargs["define_macros"] = [("FUSED_OPTIM_WITH_CUDA", "1")]
        if cuda_big_kernel_args():
            kwargs["define_macros"].append(("FUSED_OPTIM_CUDA_BIG_ARGS", "1"))
    # FUSED_OPTIM_ISA_COPIES=baseline compiles the CPU loops for the x86-64 baseline only
    # (Note [ISA dispatch] in csrc/cpu/multi_tensor.h): one copy to compile instead of four,
    # with slower CPU steps. For tools/check_cuda_build.sh and CI's smoke lanes, which check
    # the CUDA sources and a torch release, not the loops' ISA copies.
    if os.environ.get("FUSED_OPTIM_ISA_COPIES", "all") == "baseline":
        kwargs.setdefault("define_macros", []).append(("FUSED_OPTIM_BASELINE_ONLY", "1"))
    omp_compile, omp_link = openmp_flags()
    cxx_flags += omp_compile
    extra = {"cxx": cxx_flags}
    if with_cuda:
        # -fmad=false: Note [no FP contraction] for device code. The host code of the .cu
        # files (coefficients, Note [per-step coefficients]) gets the C++ flags, so it
        # rounds as the .cpp files do.
        extra["nvcc"] = ["-O3", "-fmad=false"] + [
            arg for flag in cxx_flags if flag != "-O3" and not flag.startswith("-std=")
            for arg in ("-Xcompiler", flag)]
    ext = ext_cls(
        "fused_optim._C",
        sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args=extra,
        extra_link_args=omp_link,
        **kwargs,
    )
    ext.fused_optim_build_info = (with_cuda, why_no_cuda)  # (written by BuildExt once built)
    return [ext]


if __name__ == "__main__":  # (tests/test_install.py imports this file to test its checks)
    setup(
        ext_modules=extensions(),
        cmdclass={"build_ext": BuildExt},
    )
