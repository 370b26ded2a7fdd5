"""Loads the compiled extension, with a clear message when it does not match torch."""
import importlib
import warnings

import torch

from . import _support

_REBUILD = (
    "Rebuild fused_optim against the installed torch, from its source tree: "
    "`pip install --no-build-isolation -e .` (or, for a non-editable install, "
    "`pip install --no-build-isolation --force-reinstall --no-deps .`)."
)


def load_extension():
    error, warning = _support.torch_problem(torch.__version__)
    if error:
        raise ImportError(error)
    if warning:
        warnings.warn(warning, stacklevel=3)
    try:
        build_info = importlib.import_module("fused_optim._build_info")
    except ImportError:
        raise ImportError(
            "fused_optim's C++ extension has not been built. " + _REBUILD
        ) from None
    if build_info.TORCH_VERSION != torch.__version__:
        raise ImportError(
            f"fused_optim was built against torch {build_info.TORCH_VERSION}, but torch "
            f"{torch.__version__} is imported: the compiled kernels would not load. " + _REBUILD
        )
    try:
        importlib.import_module("fused_optim._C")
    except ImportError as e:  # e.g. undefined symbols after a torch change of the same version
        raise ImportError(
            f"fused_optim's C++ extension failed to load against torch {torch.__version__} "
            f"({e}). " + _REBUILD
        ) from e
    return build_info


def built_with_cuda() -> bool:
    return bool(importlib.import_module("fused_optim._build_info").WITH_CUDA)


def why_no_cuda() -> str:
    """Why the build has no CUDA kernels, as setup.py recorded it (builds made before it did
    say nothing)."""
    return getattr(importlib.import_module("fused_optim._build_info"), "WHY_NO_CUDA", None) or ""
