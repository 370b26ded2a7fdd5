"""fused_optim: fused multi-tensor SGD, Adam, AdamW, RMSprop, Adagrad, Adamax, Adadelta,
NAdam, RAdam, Rprop, ASGD, SparseAdam, Adafactor and Muon kernels, a drop-in for torch.optim.

    import fused_optim
    opt = fused_optim.AdamW(model.parameters(), lr=1e-3)   # instead of torch.optim.AdamW
"""
try:
    import torch  # noqa: F401  (must come first: _C links against torch's libraries)
except ImportError as _e:  # torch is not a declared dependency: pip never installs it for us
    raise ImportError(
        "fused_optim needs PyTorch, and this environment has none (" + str(_e) + "). Install "
        "the torch release fused_optim was built against (fused_optim/_build_info.py names "
        "it), or a supported one and rebuild: docs/install.md."
    ) from None

from ._loader import load_extension as _load_extension

_load_extension()

from . import _ops  # noqa: E402,F401  (fake kernels for torch.compile)
from .adafactor import Adafactor  # noqa: E402
from .asgd import ASGD  # noqa: E402
from .adadelta import Adadelta  # noqa: E402
from .adagrad import Adagrad  # noqa: E402
from .adam import Adam, AdamW  # noqa: E402
from .adamax import Adamax  # noqa: E402
from .clip import clip_grad_norm_, clip_grads_with_norm_, get_total_norm  # noqa: E402
from .nadam import NAdam  # noqa: E402
from .radam import RAdam  # noqa: E402
from .rmsprop import RMSprop  # noqa: E402
from .rprop import Rprop  # noqa: E402
from .sgd import SGD  # noqa: E402
from .sparse_adam import SparseAdam  # noqa: E402

if hasattr(torch.optim, "Muon"):  # torch 2.9 and later
    from .muon import Muon  # noqa: E402,F401

from .backward import step_in_backward  # noqa: E402
from .quantization import to_torch_state_dict  # noqa: E402

# Note [the whole namespace]
# `import fused_optim as optim` works for any torch.optim script: every name of the
# installed torch.optim.__all__ is here. FUSED are our kernels' classes (subclasses of
# torch's); TORCH_OWN are torch's own objects, re-exported as they are: the base class,
# schedulers and SWA, and LBFGS (its cost is closure evaluations, not the update). A name
# outside both sets fails tests/test_api.py, so a torch upgrade that adds one is noticed.
FUSED = ("SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Adamax", "Adadelta", "NAdam", "RAdam",
         "Rprop", "ASGD", "SparseAdam", "Adafactor")
FUSED += ("Muon",) if hasattr(torch.optim, "Muon") else ()  # (torch 2.9 and later)
TORCH_OWN = ("Optimizer", "lr_scheduler", "swa_utils", "swap_in_optimizer_params_and_state",
             "LBFGS", "functional")  # (functional: torch 2.15's functional API, torch's own)
_TORCH_MODULES = ("lr_scheduler", "swa_utils", "functional")


def _reexport_torch_names():
    import sys

    names = []
    for name in TORCH_OWN:
        if name in torch.optim.__all__:
            obj = getattr(torch.optim, name)
            globals()[name] = obj
            names.append(name)
            if name in _TORCH_MODULES:  # `from fused_optim.lr_scheduler import X`
                sys.modules[f"{__name__}.{name}"] = obj
    return names


# Beyond torch.optim's names: torch.nn.utils' clipping functions, fused (clip.py), and
# the step run inside backward (backward.py).
EXTRAS = ("clip_grad_norm_", "get_total_norm", "clip_grads_with_norm_", "step_in_backward",
          "to_torch_state_dict")
__all__ = list(FUSED) + _reexport_torch_names() + list(EXTRAS)
__version__ = "0.1.0"
