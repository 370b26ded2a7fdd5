"""fused_optim: fused multi-tensor SGD, Adam, AdamW, RMSprop and Adagrad kernels, a drop-in
for torch.optim.

    import fused_optim
    opt = fused_optim.AdamW(model.parameters(), lr=1e-3)   # instead of torch.optim.AdamW
"""
import torch  # noqa: F401  (must come first: _C links against torch's libraries)

from ._loader import load_extension as _load_extension

_load_extension()

from . import _ops  # noqa: E402,F401  (fake kernels for torch.compile)
from .adagrad import Adagrad  # noqa: E402
from .adam import Adam, AdamW  # noqa: E402
from .rmsprop import RMSprop  # noqa: E402
from .sgd import SGD  # noqa: E402

__all__ = ["SGD", "Adam", "AdamW", "RMSprop", "Adagrad"]
__version__ = "0.1.0"
