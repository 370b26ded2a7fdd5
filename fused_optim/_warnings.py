"""Warnings attributed to the user's line: the first frame outside fused_optim and the
torch code that calls it (torch.optim's step wrappers and schedulers, GradScaler.step,
Dynamo's frames around a compiled step, contextlib's and torch's context-manager
decorators), however many of those lie between. A fixed
stacklevel pointed inside torch: torch's Optimizer wraps each class's step in its
profiling hook, and a scheduler or a decorator adds frames of its own."""
import contextlib
import os
import sys
import warnings

import torch
import torch._dynamo
import torch.amp
import torch.optim
import torch.utils._contextlib

_INTERNAL = (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,
    os.path.dirname(os.path.abspath(torch.optim.__file__)) + os.sep,
    os.path.dirname(os.path.abspath(torch.amp.__file__)) + os.sep,  # (GradScaler.step)
    os.path.dirname(os.path.abspath(torch._dynamo.__file__)) + os.sep,  # (a compiled step)
    os.path.abspath(contextlib.__file__),
    os.path.abspath(torch.utils._contextlib.__file__),
)


def _internal(filename: str) -> bool:
    return os.path.abspath(filename).startswith(_INTERNAL)


def warn(message: str, category: type = UserWarning) -> None:
    """warnings.warn(message, category), attributed to the first frame outside the code
    above (the user's call of the optimizer, the scheduler or the function)."""
    if torch.compiler.is_compiling():
        # (the frames are not traceable: Dynamo would warn of sys._getframe, and the
        # warning is given again where the step runs eagerly, after its graph break)
        warnings.warn(message, category, stacklevel=2)
        return
    frame = sys._getframe(1)
    level = 2  # (1 is this function's own frame)
    while frame is not None and _internal(frame.f_code.co_filename):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)
