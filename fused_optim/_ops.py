"""Calls of torch.ops.fused_optim.*, and their fake (meta) kernels.

The schemas are in csrc/ops.cpp. The ops mutate their tensor-list arguments in place and
return nothing, so a fake kernel has nothing to compute: registering it is what lets
torch.compile trace through an optimizer step without a graph break.
"""
import contextlib
import itertools
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

_lib = torch.ops.fused_optim


@contextlib.contextmanager
def real_tensors():
    """Make real CPU tensors whatever mode is active: the few that fused_optim makes at
    import (the 8-bit maps, Muon's probe). `import fused_optim` inside a FakeTensorMode
    (a tracer's) made fake ones and failed reading their values; the default device is
    handled by device="cpu" where they are made."""
    try:
        from torch.utils._python_dispatch import _disable_current_modes
    except ImportError:  # (a torch without it: nothing to disable)
        yield
        return
    with _disable_current_modes():
        yield


def bump_versions(tensors: List[Tensor]) -> None:
    """Note [version counters]: the kernels write params in place behind autograd's back
    (and clipping its grads); their version counters are bumped as torch's in-place ops
    bump them, so that autograd refuses a graph that saved an old value (a retained graph
    after a step, a param read later in the backward that step_in_backward updated it in,
    a grad made with create_graph=True), as it does after torch's own ops. (_C._step and
    _C._mul_grads_ bump their own in C++. Under torch.compile the op's declared mutations
    are functionalized instead.)"""
    if not torch.compiler.is_compiling():
        torch.autograd.graph.increment_version(tensors)


def dtensor_class() -> Optional[type]:
    """torch's DTensor class where torch.distributed.tensor is imported; None where it is
    not (then no tensor can be one), so that nothing here imports torch.distributed."""
    module = sys.modules.get("torch.distributed.tensor")
    return module.DTensor if module is not None else None


def _local(*lists: List[Tensor]):
    """The tensors the kernels update: a DTensor (FSDP2's sharded params, their grads and
    states) is replaced by its local shard, which the kernel updates in place, with no
    gather. Costs nothing where torch.distributed.tensor was never imported, and little
    where it was (torch.optim.Optimizer's constructor imports it): one C-speed scan of the
    types of params and grads."""
    cls = dtensor_class()
    if cls is None:
        return lists
    params, grads = lists[0], lists[1]
    kinds = set(map(type, params))
    kinds.update(map(type, grads))
    if not any(issubclass(k, cls) for k in kinds):
        return lists
    for p, g in zip(params, grads):
        if isinstance(p, cls) or isinstance(g, cls):
            # An elementwise update of local shards is right only where every tensor of a
            # param is laid out across ranks the same way (FSDP2: Shard(0) everywhere).
            same = isinstance(p, cls) and isinstance(g, cls) and p.placements == g.placements
            if not same or p.device_mesh != g.device_mesh:
                raise RuntimeError(
                    "fused_optim: a DTensor param and its grad must have the same device mesh "
                    f"and placements, got {getattr(p, 'placements', 'a plain tensor')} and "
                    f"{getattr(g, 'placements', 'a plain tensor')}")
    return tuple([t._local_tensor if isinstance(t, cls) else t for t in ts] for ts in lists)


# The optimizer ops (csrc/ops.cpp), each the kernel of one algorithm class's `_op`.
OPTIMIZER_OPS = ("sgd_", "adam_", "rmsprop_", "adagrad_", "adamax_", "adadelta_", "nadam_",
                 "radam_", "rprop_", "asgd_", "sparse_adam_", "adafactor_", "muon_")
# Ops with no CUDA kernel (none now; Adafactor's came on 2026-12-04): their classes would run
# torch's own step for CUDA params, with a one-time warning, and
# tools/check_cuda_registrations.py would not ask for them.
CPU_ONLY_OPS: tuple = ()


def _is_list(t) -> bool:
    """A tensor list argument, or an optional one (param_aux: Note [param storage])."""
    return isinstance(t, torch.ListType) or (
        isinstance(t, torch.OptionalType) and isinstance(t.getElementType(), torch.ListType))


# The names of each op's arguments that are not tensor lists, in schema order, and the
# number of its required lists (read once, here, so that torch.compile never traces a
# schema lookup). An op with the param storage's `param_aux` ends with it, after
# `param_mode` (csrc/ops.cpp): a caller's list after the required ones is that.
_ARG_NAMES: Dict[str, Tuple[str, ...]] = {
    op: tuple(a.name for a in getattr(_lib, op).default._schema.arguments if not _is_list(a.type))
    for op in OPTIMIZER_OPS + ("_muon_aten_",)
}
_NUM_LISTS: Dict[str, int] = {
    op: sum(isinstance(a.type, torch.ListType) for a in getattr(_lib, op).default._schema.arguments)
    for op in OPTIMIZER_OPS + ("_muon_aten_",)
}

# The op's bool arguments: a group's flag may be any truthy or falsy value, as torch's
# for-loop takes it (amsgrad="yes", maximize=None), where the schema wants a bool.
_BOOL_ARGS: Dict[str, Tuple[str, ...]] = {
    op: tuple(a.name for a in getattr(_lib, op).default._schema.arguments
              if isinstance(a.type, torch.BoolType))
    for op in OPTIMIZER_OPS + ("_muon_aten_",)
}


# The op's float arguments: a group's hyper-parameter set to a string or None would reach
# the op's schema check, a RuntimeError that prints the whole call; torch's step raises a
# TypeError in its arithmetic.
_FLOAT_ARGS: Dict[str, Tuple[str, ...]] = {
    op: tuple(a.name for a in getattr(_lib, op).default._schema.arguments
              if isinstance(a.type, torch.FloatType))
    for op in OPTIMIZER_OPS + ("_muon_aten_",)
}


def check_number(name: str, value: Any) -> None:
    """Raises for a hyper-parameter that is a string (from a config file) or None: a
    TypeError, as torch's step raises one in its arithmetic (its message is that
    arithmetic's, which differs from op to op), before anything changes. Anything else
    that float() takes (a 0-d NumPy array, a Decimal) steps as before."""
    if value is None or isinstance(value, (str, bytes, bytearray)):
        raise TypeError(f"{name} must be a number or a 1-element tensor, not "
                        f"{type(value).__name__} ({value!r})")


def schema_args(op: str, kwargs: Dict[str, Any], grad_scale: Optional[Tensor],
                found_inf: Optional[Tensor]) -> Tuple[Any, ...]:
    """The op's arguments other than its tensor lists, in schema order (csrc/ops.cpp),
    from `kwargs` and the GradScaler's grad_scale and found_inf."""
    kwargs = dict(kwargs, grad_scale=grad_scale, found_inf=found_inf)
    names = _ARG_NAMES[op]
    if "param_mode" in names and "param_mode" not in kwargs:
        kwargs["param_mode"] = 0  # round to nearest (Note [param storage])
    if len(kwargs) != len(names):
        raise TypeError(f"fused_optim::{op} takes {names}, got {tuple(kwargs)}")
    for name in _FLOAT_ARGS[op]:
        check_number(name, kwargs[name])
    for name in _BOOL_ARGS[op]:
        flag = kwargs[name]
        if flag is not True and flag is not False:
            kwargs[name] = bool(flag)
    return tuple(kwargs[name] for name in names)


def scaler_args(op: str, args: Tuple[Any, ...]) -> Tuple[Any, Any]:
    """(grad_scale, found_inf) of schema_args' `args`."""
    names = _ARG_NAMES[op]
    return args[names.index("grad_scale")], args[names.index("found_inf")]


def call(op: str, params: List[Tensor], grads: List[Tensor], state_lists: Sequence[List[Tensor]],
         args: Tuple[Any, ...]) -> None:
    """torch.ops.fused_optim.<op> on the lists (DTensors replaced by their local shards),
    with `args` from schema_args: one call per device where the params are on several (a
    kernel runs on one device; a param's grad and state are on its device, except steps
    that torch keeps on the CPU)."""
    lists = _local(params, grads, *state_lists)
    kernel = getattr(_lib, op)
    n = _NUM_LISTS[op]  # lists after the required ones: param_aux, after the scalars
    device = params[0].device if params else None
    if all(p.device == device for p in params):
        kernel(*lists[:n], *_scalars_on(device, args), *_aux(lists[n:]))
        return
    buckets: Dict[torch.device, List[int]] = {}
    for i, p in enumerate(params):
        buckets.setdefault(p.device, []).append(i)
    for dev, indices in buckets.items():
        split = [[ts[i] for i in indices] if ts else ts for ts in lists]
        kernel(*split[:n], *_scalars_on(dev, args), *_aux(split[n:]))


def _aux(lists: Sequence[List[Tensor]]) -> Tuple[List[Tensor], ...]:
    """The op's param_aux, one list: the mode's buffers, then the 8-bit states' scales
    (Note [state storage] in csrc/plan.h), each given as a list of its own."""
    if len(lists) <= 1:
        return tuple(lists)
    return ([t for ts in lists for t in ts],)


def _scalars_on(device: Optional[torch.device], args: Tuple[Any, ...]) -> Tuple[Any, ...]:
    """`args` with each tensor (lr, grad_scale, found_inf) that lives on an accelerator
    other than `device` copied to `device`, as torch's fused optimizers do: a GradScaler
    keeps them on one device, and a kernel reads them where its params are (CPU tensors
    are read on the host by every kernel; a CUDA one in a CPU call would also make the
    dispatcher pick the CUDA kernel)."""
    if device is None or not any(isinstance(a, Tensor) for a in args):
        return args
    return tuple(a.to(device) if isinstance(a, Tensor) and a.device != device
                 and a.device.type != "cpu" else a for a in args)


def stream_(inout: List[Tensor], read_only: List[Tensor], scale: float) -> None:
    """Benchmark helper: inout[k] = inout[k] * scale + sum(read_only) elementwise."""
    _lib._stream_(inout, read_only, scale)


def _nothing_to_compute(*args, **kwargs):
    """The fake kernel of every op here: each one mutates its list arguments in place and
    returns nothing, so under tracing there is no output to describe."""
    return None


def _fake_optimizer_op(op: str) -> Callable[..., None]:
    """An optimizer op's fake kernel, which is its Meta kernel too: the dispatcher picks it
    for a call where any tensor is on the meta device. A call on meta params computes
    nothing (there is no data). A meta tensor beside CPU or CUDA params (a state replaced
    by one) made the step a silent no-op (found by a review, 2026-12-06): refused, as the
    CPU kernel refuses a state on another device. (FakeTensors are on their fake device.)"""
    def fake(*args: Any, **kwargs: Any) -> None:
        params = args[0] if args else kwargs.get("params", [])
        real = next((p for p in params if p.device.type != "meta"), None)
        if real is None:
            return None  # (meta params only: no data, nothing to compute)
        names = [a.name for a in getattr(_lib, op).default._schema.arguments]
        for name, value in itertools.chain(zip(names, args), kwargs.items()):
            tensors = value if isinstance(value, (list, tuple)) else [value]
            for i, t in enumerate(tensors):
                if isinstance(t, Tensor) and t.device.type == "meta":
                    where = f"{name}[{i}]" if isinstance(value, (list, tuple)) else name
                    raise RuntimeError(f"fused_optim::{op}: {where} is on meta but a param "
                                       f"is on {real.device}")
        return None
    return fake


for _op in OPTIMIZER_OPS:
    torch.library.register_fake(f"fused_optim::{_op}")(_fake_optimizer_op(_op))
for _op in ("_muon_aten_", "_stream_", "_mul_"):
    torch.library.register_fake(f"fused_optim::{_op}")(_nothing_to_compute)


@torch.library.register_fake("fused_optim::_side_by_side")
def _side_by_side_fake(like: List[Tensor], copy: bool) -> List[Tensor]:
    return [torch.empty_like(t) for t in like]


@torch.library.register_fake("fused_optim::_norms")
def _norms_fake(tensors: List[Tensor], ord: float, inv_scale: float = 1.0) -> Tensor:
    return tensors[0].new_empty((len(tensors),))


def param_list(group: dict) -> list:
    """A group's params as the list that the C++ functions (_C._step, the clipping's and
    the sparse-grad scan) take: torch's add_param_group makes it a list, but a user may
    have set a tuple since, which torch's step iterates as well."""
    params = group["params"]
    return params if type(params) is list else list(params)
