"""The base class of every fused_optim optimizer: the step loop and the torch.optim contract.

Each algorithm class derives from this class and from the torch.optim class it replaces,
in that order (``class Adam(FusedOptimizer, torch.optim.Adam)``). torch's class supplies the
constructor's validation and errors, ``param_groups``, ``__setstate__``, ``state_dict`` /
``load_state_dict``, hooks and ``repr``, so all of them are exactly torch's; this class
replaces ``step()`` with one fused kernel call per param group.

Note [state]
All state lives in ``self.state`` as plain tensors with torch's keys, dtypes and layouts
(the C++ kernels hold none), so a checkpoint moves between torch.optim and fused_optim in
both directions, and schedulers, GradScaler and torch.distributed see what they expect.
"""
import inspect
import threading
import types
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor
from torch.optim.optimizer import _device_dtype_check_for_fused, _get_scalar_dtype

from . import _C, _ops, quantization
from ._ops import bump_versions, param_list
from .clip import clip_in_step, clip_options
from ._loader import built_with_cuda, why_no_cuda
from ._warnings import warn


# Note [param storage] (csrc/plan.h): how 16-bit params are kept between steps. Each option
# is the kernels' param_mode, with the state entry that holds its buffer.
_STORAGE = {
    "kahan_summation": (1, "kahan_comp"),
    "stochastic_rounding": (2, "rounding_state"),
    "master_weights": (3, "master_param"),
}
_STORAGE_OPTION = {key: option for option, (_, key) in _STORAGE.items()}
# The moments that hold squared grads (a float16 state_dtype loses their small values).
_SQUARED_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq", "square_avg", "acc_delta", "sum")
# Note [state storage] (csrc/plan.h): the dtypes state_dtype takes; uint8 is 8-bit
# block-quantized (Note [8-bit state] in csrc/cpu/quant8.h, fused_optim/quantization.py).
_STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.uint8)
_ABSMAX = "_absmax"  # an 8-bit moment's block scales: state[key + _ABSMAX]

# Note [small states side by side]
# torch.optim makes a param's state tensors one at a time (zeros_like and the like), so on
# the CPU a group of many small params has its states spread through the heap, with the
# allocator's bookkeeping between one tensor and the next (about 600 bytes, 10 cache
# lines, between tensors of a few KB). The hardware prefetchers follow a stream across a
# gap of a few lines only: on an AMD EPYC (Zen 5), one thread summing 5,000 tensors of
# 64..4,096 floats took 0.9 ms where they lay end to end, the same with gaps of up to 6
# lines, and 1.7-2.9 ms with gaps of 8 lines or more (each tensor started its stream over,
# with cache misses). So the state tensors of small CPU params that are shaped like their
# param (the moments, momentum buffers, master weights and the like) lie side by side, one
# allocation per state key, in the group's order (fused_optim::_side_by_side): a step that
# makes state (step(), or a bucket of step in backward: _update_placing_state) makes the
# zero ones there (_StateArena, through zeros_states and SGD's buffers), and copies the
# others there after the update (Rprop's step sizes, the storage modes' buffers,
# state_dtype's moments); Adagrad's constructor copies the sums torch's made. Not
# load_state_dict: torch.optim's state after it is the state_dict's own tensors (shared
# memory, pinned, memory-mapped, seen by load hooks), and so is ours. Each tensor keeps a
# storage of its own, its dtype, shape, strides and values: state_dict, torch.save,
# checkpoints and torch.optim see what they would see, and every update gives the same
# bits. W3 (5,000 tensors, 2 threads, same process): 3-12% faster (docs/benchmarks.md,
# "Many small tensors"). Only for plain contiguous CPU tensors (not DTensors or other
# subclasses; a GPU has no such prefetchers) of at most _SIDE_BY_SIDE_MAX elements (a
# longer tensor's stream is long enough that its start costs little), and not under
# torch.compile. The allocation is freed with the last of its tensors: a state entry that
# a user deletes keeps its bytes until its neighbours go too.
_SIDE_BY_SIDE_MAX = 1 << 16
_MASK64 = (1 << 64) - 1


def _mix64(z: int) -> int:
    """SplitMix64's output function (csrc/rounding.h), on Python ints."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _unmix64(z: int) -> int:
    """_mix64's inverse (each of its steps is a bijection of 64-bit words)."""
    z &= _MASK64
    z ^= (z >> 31) ^ (z >> 62)
    z = (z * pow(0x94D049BB133111EB, -1, 1 << 64)) & _MASK64
    z ^= (z >> 27) ^ (z >> 54)
    z = (z * pow(0xBF58476D1CE4E5B9, -1, 1 << 64)) & _MASK64
    z ^= (z >> 30) ^ (z >> 60)
    return z


# fused_optim's constructor options beyond torch's, with their annotations.
_FUSED_OPTIONS = {"max_grad_norm": Optional[float], "grad_norm_type": float,
                  "master_weights": bool, "kahan_summation": bool, "stochastic_rounding": bool,
                  "state_dtype": Optional[torch.dtype]}


# Whether the CPU loops' choices were made (FusedOptimizer._update_placing_state).
_cpu_choices_made = False

# c10's names of the complex dtypes, as its dispatch errors print them.
C10_NAMES = {torch.complex32: "ComplexHalf", torch.complex64: "ComplexFloat",
             torch.complex128: "ComplexDouble"}

# The param dtypes the kernels take (is_supported_dtype in csrc/plan.h); a step with others
# runs torch's own (_torch_grads_reason).
_KERNEL_DTYPES = frozenset((torch.float32, torch.float64, torch.bfloat16, torch.float16,
                            torch.complex64, torch.complex128))


def _dispatch_subclass(t: Tensor) -> bool:
    """Whether t is a tensor subclass that the dispatcher hands back to Python
    (__torch_dispatch__), DTensors excepted: the op runs inside it as it chooses (a
    wrapper subclass, once per inner tensor), where the kernel's plain state tensors
    (the step counts) would be counted once per run."""
    kind = type(t)
    if kind is Tensor or kind is torch.nn.Parameter:
        return False
    known = _DISPATCH_KINDS.get(kind)
    if known is None:  # (once per type: FSDP2's steps ask it of every DTensor, every step)
        known = _DISPATCH_KINDS[kind] = (
            getattr(kind, "__torch_dispatch__", None) is not Tensor.__torch_dispatch__
            and not quantization.is_dtensor(t))
    return known


_DISPATCH_KINDS: Dict[type, bool] = {}


def is_numpy_scalar(value: Any) -> bool:
    """Whether `value` is a NumPy number (or, traced by Dynamo, the array it becomes): not
    imported, so NumPy stays optional."""
    return type(value).__module__ == "numpy"


class FusedOptimizer(torch.optim.Optimizer):
    # Set per algorithm: the torch.optim class it replaces, and the group options that
    # make us run that class's own step instead of the kernel.
    # Note [capturable]: a capturable group's step can be captured in a CUDA graph: no host
    # synchronisation. The CUDA kernels honour it (steps on the device are incremented and
    # read there, and so are a Tensor lr, grad_scale and found_inf), so a group whose params
    # are all CUDA tensors runs our kernel. torch.compile also marks every group
    # capturable=True while it traces a step (on CPU too), so a compiled step would never
    # reach our kernel if we refused it; there the CPU kernels read and increment `step`
    # and read a tensor lr themselves. Otherwise (CPU params in eager mode) capturable=True
    # runs torch's own step, which refuses CPU params with torch's own error.
    _torch_class: type = torch.optim.Optimizer
    _torch_only_options = ("differentiable", "capturable")
    # False where the CUDA kernels compute the algorithm's coefficients on the host (Note
    # [scalar states] in csrc/plan.h): a capturable CUDA group then runs torch's step.
    _cuda_capturable = True

    _warned: set = set()

    # The name of the method of torch's Optimizer that torch's step of this algorithm calls
    # first, to refuse a CUDA graph capture of groups that are not capturable, or None where
    # it calls none (SGD, Adagrad, SparseAdam, Muon): read from its code.
    _capture_check: Optional[str] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        torch_class = cls.__dict__.get("_torch_class")
        if "step" not in cls.__dict__ and "step" in getattr(torch_class, "__dict__", {}):
            # Each algorithm its own step function (the same code), named <Class>.step where
            # torch's class has its own (AdamW's is Adam's): torch's step hooks wrap and
            # print it (a pre hook's bad return named FusedOptimizer.step, found by a
            # review, 2026-12-06).
            f = FusedOptimizer.step
            step = types.FunctionType(f.__code__, f.__globals__, "step", f.__defaults__,
                                      f.__closure__)
            step.__kwdefaults__, step.__doc__ = f.__kwdefaults__, f.__doc__
            step.__annotations__ = dict(f.__annotations__)
            step.__qualname__, step.__module__ = f"{cls.__qualname__}.step", cls.__module__
            cls.step = step
        torch_step = getattr(cls.__dict__.get("_torch_class"), "step", None)
        while hasattr(torch_step, "__wrapped__"):  # (torch's decorators)
            torch_step = torch_step.__wrapped__
        if torch_step is not None:
            names = getattr(getattr(torch_step, "__code__", None), "co_names", ())
            cls._capture_check = next((n for n in ("_accelerator_graph_capture_health_check",
                                                   "_cuda_graph_capture_health_check")
                                       if n in names), None)
        # The constructor's annotations are torch's for torch's parameters (what
        # inspect.signature, type checkers and IDEs show), as its names and defaults are.
        init = cls.__dict__.get("__init__")
        torch_init = getattr(cls.__dict__.get("_torch_class"), "__init__", None)
        theirs = getattr(torch_init, "__annotations__", None)
        if init is None or not theirs:
            return
        names = init.__code__.co_varnames[:init.__code__.co_argcount
                                          + init.__code__.co_kwonlyargcount]
        init.__annotations__ = {**{k: v for k, v in theirs.items()
                                   if k in names or k == "return"},
                                **{k: v for k, v in _FUSED_OPTIONS.items() if k in names},
                                **init.__annotations__}


    # The state entries state_dtype applies to (Note [state storage]): the moments, the
    # elementwise states the rule reads and writes, in the kernel's order. Empty where an
    # algorithm has none that can be kept in fewer bits (ASGD's average of the params,
    # Rprop's step sizes).
    _moment_keys: Tuple[str, ...] = ()
    # The 0-dim float states the update reads besides `step` (Note [scalar states] in
    # csrc/plan.h): NAdam's mu_product, ASGD's eta and mu. torch's load_state_dict casts
    # them to the param's dtype; with a mode or a state_dtype they keep their saved dtype, so
    # that a checkpoint resumes bit for bit (load_state_dict).
    _scalar_state_keys: Tuple[str, ...] = ()

    def _fused_setup(self, max_grad_norm: Optional[float] = None, grad_norm_type: float = 2.0,
                     *, master_weights: bool = False, kahan_summation: bool = False,
                     stochastic_rounding: bool = False, state_dtype: Optional[torch.dtype] = None
                     ) -> None:
        """Called at the end of each algorithm's __init__, with its fused_optim options."""
        # The options' types first (a string or None taken for a flag, True for a norm, a
        # tensor of many elements: found by a review, 2026-12-06).
        for name, value in (("master_weights", master_weights),
                            ("kahan_summation", kahan_summation),
                            ("stochastic_rounding", stochastic_rounding)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, got {value!r}")
        max_grad_norm, grad_norm_type = clip_options(max_grad_norm, grad_norm_type)
        # Note [state storage]: the moments' dtype, checked before anything else is set.
        if state_dtype is not None and state_dtype not in _STATE_DTYPES:
            raise ValueError(
                "state_dtype must be None (the param's dtype, as torch.optim), torch.float32, "
                "torch.bfloat16, torch.float16 or torch.uint8 (8-bit block-quantized moments), "
                f"got {state_dtype!r}")
        if state_dtype is not None and not self._moment_keys:
            raise ValueError(
                f"state_dtype does not apply to {type(self).__name__}: its state holds no "
                "moments that can be kept in fewer bits")
        self._state_dtype: Optional[torch.dtype] = state_dtype
        squared = [k for k in self._moment_keys if k in _SQUARED_MOMENTS]
        if state_dtype is torch.float16 and squared:
            # (the update matches its reference bit for bit; the reference itself loses the
            # moment: found by a review, 2026-12-06, Adam with grads of 1e-4 stepping 18x as
            # far as torch's over 1,000 steps)
            warn(
                f"{type(self).__name__}: state_dtype=torch.float16 keeps {', '.join(squared)} "
                "(sums of squared grads) in float16, whose smallest value is 6e-8: squared "
                "grads below that (grads under about 2e-4, or 8e-3 once scaled by 1 - beta2 = "
                "0.001) are lost, and the steps grow. torch.bfloat16 keeps float32's range")
        # Note [param storage]: at most one way to keep 16-bit params, for every group.
        chosen = [name for name, on in (("kahan_summation", kahan_summation),
                                        ("stochastic_rounding", stochastic_rounding),
                                        ("master_weights", master_weights)) if on]
        if len(chosen) > 1:
            raise ValueError(f"{' and '.join(chosen)} cannot be combined: each is a way to keep "
                             "16-bit params between steps; choose one")
        self._storage_option: Optional[str] = chosen[0] if chosen else None
        differentiable = [i for i, g in enumerate(self.param_groups) if g.get("differentiable")]
        if differentiable and (chosen or state_dtype is not None):
            # (torch's own step runs for differentiable=True, every step: refused here, as the
            # step would refuse it)
            self._refuse_torch_step(f"differentiable=True (param group {differentiable[0]})")
        self._param_mode, self._storage_key = _STORAGE[chosen[0]] if chosen else (0, None)
        if chosen or state_dtype is not None:
            for index in range(len(self.param_groups)):
                self._check_storage(index)
        if state_dtype is not None:
            # State torch's constructor made (Adagrad's sum), in state_dtype's form: made
            # again from its option's value in float32 first, as the reference (torch's
            # for-loop in float32, its moments stored as state_dtype says) makes it; torch
            # made it in a 16-bit param's dtype, and converting that rounded the value
            # twice (found by a review, 2026-12-06: 0.1 was bfloat16's 0.10009765625). The
            # value is the constructor's (self.defaults), as torch's constructor fills it, not
            # a param group's own (found by a differential fuzz, 2026-12-08).
            for group in self.param_groups:
                for p in group["params"]:
                    if p in self.state:
                        st = self.state[p]
                        for key, option in self._constructor_fills.items():
                            if isinstance(st.get(key), Tensor) and not p.is_complex():
                                st[key] = torch.full_like(p, self.defaults[option], dtype=torch.float32,
                                                          memory_format=torch.preserve_format)
                        self._convert_moments(p, st)
        if stochastic_rounding:
            # Stochastic rounding's seeds: one drawn from torch's generator now, each
            # param's derived from it and the param's position (Note [stochastic rounding]).
            # Only this option draws (after every check): with any other, the generator's
            # stream is the one torch.optim leaves, so a script's later random numbers too.
            self._rounding_seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        if self._param_mode:
            # State torch's constructor made (Adagrad's): the mode's buffer made with it, as
            # the first step would make it, so that the state has every key before a step.
            # torch.distributed.checkpoint loads only the keys an optimizer's state has, and
            # makes the state by a step only where there is none: without the buffer, a
            # checkpoint's master, compensation or rounding state was dropped as it loaded,
            # silently (found by a differential fuzz, 2026-12-08).
            for group in self.param_groups:
                for p in group["params"]:
                    if self.state.get(p):
                        self._init_storage(p, self.state[p])
        # Clipping by global norm inside step() (Note [clipping in the step], clip.py):
        # optimizer-wide, like the norm it clips by, so not a param-group option.
        self.max_grad_norm = max_grad_norm
        self.grad_norm_type = grad_norm_type  # (a float: clip_options)
        # The total norm of the last step's grads (unscaled), when max_grad_norm is set: in a
        # list, whose mutation a compiled step replays (an attribute set on an optimizer
        # inside a compiled step is not).
        self._last_grad_norm: List[Optional[Tensor]] = [None]

    # Note [GradScaler's handoff]: an optimizer whose `_step_supports_amp_scaling` is true
    # is handed a GradScaler's grad_scale and found_inf (GradScaler.step sets them on it and
    # calls step(), even on an inf/NaN step); the kernel unscales the grads as it reads them
    # and skips a step with inf/NaN grads (see step()). Other code reads the flag too:
    # Lightning refuses its gradient clipping for such an optimizer (in bf16-mixed too,
    # where no scaler runs), and skips its unscale before its on_before_optimizer_step hook;
    # Accelerate's step_was_skipped and step hooks count on a skipped step not being a call
    # of step(). So the flag is torch's own: set where torch sets it (fused=True: torch's
    # constructor sets it), and where our own options want the scale in the kernel:
    # max_grad_norm (unscaling, clipping and the update in one pass over the grads) and
    # step_in_backward (whose step() must see a scaler, to refuse it): those two turn it on
    # whatever was set. As torch's, copies and pickles do not keep what was set (torch's
    # __getstate__ leaves the flag out). Until 2026-12-06 it was always set, and Lightning
    # refused gradient_clip_val for every fused_optim optimizer (found by a review trying
    # Lightning, timm and Accelerate).
    @property
    def _step_supports_amp_scaling(self) -> bool:  # type: ignore[override]
        return bool(self.__dict__.get("_amp_scaling_requested", False)
                    or self.__dict__.get("max_grad_norm") is not None
                    or self.__dict__.get("_fused_step_in_backward") is not None)

    @_step_supports_amp_scaling.setter
    def _step_supports_amp_scaling(self, value: bool) -> None:
        # (torch's constructor sets it for fused=True; a user may set it too)
        self._amp_scaling_requested = bool(value)

    @_step_supports_amp_scaling.deleter
    def _step_supports_amp_scaling(self) -> None:
        self.__dict__.pop("_amp_scaling_requested", None)

    # The options _fused_setup sets beyond torch's: kept by copies and pickles, which
    # otherwise hold only torch's defaults, state and param_groups (torch's __getstate__),
    # and would step without them (torch's __setstate__ restores whatever is given).
    _FUSED_ATTRIBUTES = ("max_grad_norm", "grad_norm_type", "_last_grad_norm",
                         "_storage_option", "_param_mode", "_storage_key", "_rounding_seed",
                         "_state_dtype")

    def __getstate__(self) -> Dict[str, Any]:
        state = super().__getstate__()
        state.update({k: self.__dict__[k] for k in self._FUSED_ATTRIBUTES if k in self.__dict__})
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        # (a pickle made before Note [GradScaler's handoff] holds the flag itself, which the
        # property would hide in __dict__: left out, as torch's pickles leave it out)
        state = {k: v for k, v in state.items() if k != "_step_supports_amp_scaling"}
        super().__setstate__(state)

    @property
    def last_grad_norm(self) -> Optional[Tensor]:
        """The total norm of the grads (unscaled) of the last step() that clipped by
        max_grad_norm, as torch.nn.utils.clip_grad_norm_ returns it; None before."""
        norms = getattr(self, "_last_grad_norm", None)
        return norms[0] if norms else None

    def _check_storage(self, index: int) -> None:
        """A mode of Note [param storage] applies to 16-bit params, and state_dtype (Note
        [state storage]) to float32 and 16-bit params (CPU or CUDA): param group `index` has
        only those, or the error names the option and the param."""
        self._check_storage_dtypes(index)
        state_dtype = getattr(self, "_state_dtype", None)
        if state_dtype is not None:
            if self.param_groups[index].get("centered") and state_dtype in (torch.float16,
                                                                             torch.uint8):
                # centered RMSprop takes sqrt(square_avg - grad_avg**2): with the two moments
                # rounded apart (and float16's square_avg underflowing) that can be negative
                warn(
                    f"{type(self).__name__}: centered=True with state_dtype={state_dtype} can "
                    "make square_avg - grad_avg**2 negative, and the params NaN (float16's "
                    "square_avg underflows; 8-bit moments are rounded apart): float32 or "
                    "bfloat16 moments keep it right")

    def _check_storage_dtypes_of_every_group(self) -> None:
        for index in range(len(self.param_groups)):
            self._check_storage_dtypes(index)

    def _check_storage_dtypes(self, index: int) -> None:
        """_check_storage's errors (not its warning): checked when a group is added, and
        again by a step where a param's dtype may have changed since (`module.float()`
        keeps the Parameter and swaps its data): on the general path before any group is
        updated, and where a fast-path step raised, for the error's names."""
        state_dtype = getattr(self, "_state_dtype", None)
        if state_dtype is not None:
            for i, p in enumerate(self.param_groups[index]["params"]):
                if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                    raise ValueError(
                        f"state_dtype applies to float32, bfloat16 and float16 params; param {i} "
                        f"of param group {index} has dtype {p.dtype} (put it in an optimizer "
                        "without state_dtype)")
                if (state_dtype is torch.uint8 and type(p) not in (torch.Tensor, torch.nn.Parameter)
                        and not quantization.is_dtensor(p)):
                    raise RuntimeError(
                        "state_dtype=torch.uint8 takes plain tensors and DTensors only (Note "
                        f"[8-bit DTensors] in quantization.py); param {i} of param group "
                        f"{index} is a {type(p).__name__}")
        option = self._storage_option
        if option is None:
            return
        for i, p in enumerate(self.param_groups[index]["params"]):
            if p.dtype not in (torch.bfloat16, torch.float16):
                raise ValueError(
                    f"{option}=True applies to bfloat16 and float16 params; param {i} of param "
                    f"group {index} has dtype {p.dtype} (put it in an optimizer without "
                    f"{option})")
            if option == "stochastic_rounding" and quantization.is_dtensor(p):
                _check_rounding_placements(p, i, index)

    def _refuse_group_options(self, group: Dict[str, Any]) -> None:
        """A param group that names one of fused_optim's options, which are optimizer-wide,
        is refused (by add_param_group, and by step() where a group was given one later):
        torch would keep the key, and nothing would apply it."""
        for key in _FUSED_OPTIONS:
            if key in group:
                raise ValueError(
                    f"{type(self).__name__}: '{key}' is an option of the optimizer, not of "
                    f"a param group: pass {key}= to the constructor (torch's "
                    "ZeroRedundancyOptimizer puts its optimizer's options in every param "
                    f"group: give it optimizer_class=functools.partial("
                    f"fused_optim.{type(self).__name__}, {key}=...) instead)")

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        # fused_optim's options are optimizer-wide (one way of keeping the params and state,
        # one norm to clip by): a param group that names one is refused, where torch would
        # keep the key and nothing would apply it.
        if isinstance(param_group, dict):
            self._refuse_group_options(param_group)
        super().add_param_group(param_group)
        if getattr(self, "_param_mode", 0) or getattr(self, "_state_dtype", None) is not None:
            try:
                self._check_storage(len(self.param_groups) - 1)
            except (ValueError, RuntimeError):
                self.param_groups.pop()  # refused: the optimizer is as it was
                raise
        supported = ("cpu", "cuda") if built_with_cuda() else ("cpu",)
        for p in self.param_groups[-1]["params"]:
            if p.device.type not in supported:
                hint = (
                    " fused_optim was built without CUDA kernels"
                    + (f" ({why_no_cuda()})" if why_no_cuda() else "")
                    + ": rebuild it where a CUDA toolkit of torch's CUDA major version and a "
                    "CUDA build of torch are installed (FUSED_OPTIM_CUDA=1 makes a build that "
                    "cannot have them fail instead): docs/install.md."
                    if p.device.type == "cuda"
                    else ""
                )
                self.param_groups.pop()  # refused: the optimizer is as it was
                raise RuntimeError(
                    f"{type(self).__name__}: a param is on device {p.device}, but fused_optim "
                    f"has kernels for {', '.join(supported)} only.{hint}"
                )

    # -- hooks for the algorithm classes ------------------------------------------------
    # The kernel, torch.ops.fused_optim.<_op>; its schema is in csrc/ops.cpp.
    _op: str = ""
    # Whether the eager fast path (Note [fast path]) can take this algorithm's groups: it
    # needs a direct call registered for _op and one state entry per param and key.
    _fast_path: bool = True
    # State that torch's constructor makes, filled with the value the constructor was given
    # for an option (self.defaults', not a param group's own): {state key: option}
    # (Adagrad's sum, initial_accumulator_value).
    _constructor_fills: Dict[str, str] = {}

    def _state_keys(self, group: Dict[str, Any]) -> Tuple[Optional[str], ...]:
        """The state key of each tensor list the kernel takes after params and grads, in
        schema order; None where the kernel gets an empty list (an option that is off)."""
        raise NotImplementedError

    def _kernel_args(self, group: Dict[str, Any]) -> Dict[str, Any]:
        """The kernel's other arguments by name (schema names), except grad_scale and
        found_inf."""
        raise NotImplementedError

    # Whether torch's _init_group looks each of a param's state keys up (False: it makes a
    # missing one, as SGD's momentum_buffer, or checks its own way).
    _torch_looks_up_state: bool = True

    def _torch_lookup_keys(self, group: Dict[str, Any]) -> Tuple[str, ...]:
        """The state keys torch's _init_group looks up for each param, in its order, where
        a missing one raises its KeyError at that param (an option that adds a state,
        switched on mid-training, as Adam's amsgrad; a state edited by hand): the state of
        the group's earlier new params is made by then, the later ones' is not. By default
        the keys of _state_keys in their order; () where _torch_looks_up_state is False;
        a class whose torch looks them up in another order says so."""
        if not self._torch_looks_up_state:
            return ()
        return tuple(k for k in self._state_keys(group) if k is not None)

    def _step_keys(self, group: Dict[str, Any]) -> Tuple[Optional[str], ...]:
        """_state_keys, then the op's param_aux: the param storage's buffer where a mode is
        on (Note [param storage]), then the 8-bit moments' scales (Note [state storage])."""
        keys = self._state_keys(group)
        return keys + self._aux_keys(keys)

    def _aux_keys(self, keys: Tuple[Optional[str], ...]) -> Tuple[str, ...]:
        """The param_aux part of _step_keys, for a group of state keys `keys`."""
        aux = (self._storage_key,) if getattr(self, "_param_mode", 0) else ()
        if getattr(self, "_state_dtype", None) is torch.uint8:
            aux += tuple(k + _ABSMAX for k in keys if k in self._moment_keys)
        return aux

    def _step_kwargs(self, group: Dict[str, Any], **extra: Any) -> Dict[str, Any]:
        """_kernel_args, and the param storage's mode where one is on."""
        kwargs = self._kernel_args(group, **extra)
        mode = getattr(self, "_param_mode", 0)
        if mode:
            kwargs["param_mode"] = mode
        return kwargs

    def _init_storage(self, p: Tensor, state: Dict[str, Any]) -> Tensor:
        """p's param storage buffer, made where it is missing (a new param, or a torch.optim
        checkpoint): Kahan's compensation zero, the master the param's float32 value, the
        rounding state p's seed and a counter of 0."""
        key = self._storage_key
        buf = state.get(key)
        if buf is None:
            if key == "kahan_comp":
                buf = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif key == "master_param":
                buf = p.detach().to(torch.float32, memory_format=torch.preserve_format, copy=True)
            else:
                # p's position among all params: a map made once, remade when a param is
                # not in it (added since), not a scan of every group for each param
                positions = self.__dict__.get("_param_positions")
                if positions is None or p not in positions:
                    positions = {q: i for i, q in enumerate(
                        q for g in self.param_groups for q in g["params"])}
                    self._param_positions = positions
                seed = _mix64(self._rounding_seed + positions[p])
                buf = torch.tensor([seed - (1 << 64) if seed >= 1 << 63 else seed, 0],
                                   dtype=torch.int64)
            state[key] = buf
        return buf

    def _kernel_storage(self, p: Tensor, buf: Tensor, pending: List[Tuple[Tensor, Tensor]]) -> Tensor:
        """The param storage's buffer as the kernel takes it: `buf`, except a DTensor's
        rounding state (stochastic rounding), which the kernel gets as [seed, counter,
        offset], offset the position of the local shard's first element in the whole param
        (Note [stochastic rounding] in csrc/rounding.h: the shard is rounded with its
        elements' own random bits); (buf, that copy) goes to `pending`, and
        _storage_done counts the step in buf after the call."""
        if self._storage_key != "rounding_state" or not quantization.is_dtensor(p):
            return buf
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, corner = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        offset = sum(i * stride for i, stride in zip(corner, p.stride()))
        passed = torch.cat([buf, buf.new_tensor([offset])])
        pending.append((buf, passed))
        return passed

    @staticmethod
    def _storage_done(pending: List[Tuple[Tensor, Tensor]]) -> None:
        """After a kernel call: the counters it counted in _kernel_storage's copies, kept."""
        for buf, passed in pending:
            buf.copy_(passed[:2])

    def _moment_dtype(self, p: Tensor) -> torch.dtype:
        """The dtype of p's moments under state_dtype (Note [state storage]): 8-bit only
        for contiguous tensors of 4,096 elements or more (quantization.quantizes), float32
        for the others."""
        dtype = self._state_dtype
        if dtype is torch.uint8 and not quantization.quantizes(p):
            return torch.float32
        return dtype

    def _convert_moments(self, p: Tensor, state: Dict[str, Any]) -> None:
        """p's moments in state_dtype's form: new state, a torch.optim checkpoint or one of
        another state_dtype are converted (cast, quantized); 8-bit ones get their scales
        (an empty tensor where p keeps float32 moments)."""
        dtype = self._moment_dtype(p)
        for key in self._moment_keys:
            v = state.get(key)
            if not isinstance(v, Tensor):
                continue
            scales = state.get(key + _ABSMAX)
            dequantized = False
            if v.dtype == torch.uint8:
                if dtype is torch.uint8 and scales is not None:
                    continue
                if scales is None:
                    raise ValueError(
                        f"{type(self).__name__}: state '{key}' is 8-bit (uint8) but has no "
                        f"'{key}{_ABSMAX}' scales")
                v, dequantized = quantization.dequantize(v, scales), True
            if dtype is torch.uint8:
                state[key], state[key + _ABSMAX] = quantization.quantize(v)
                continue
            if v.dtype != dtype or dequantized:  # (a param that no longer quantizes: float32)
                state[key] = v.to(dtype)
            if self._state_dtype is torch.uint8:
                if scales is None or scales.numel() != 0:
                    state[key + _ABSMAX] = torch.zeros(0, dtype=torch.float32, device=p.device)
            elif scales is not None:
                del state[key + _ABSMAX]

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """torch's load_state_dict, keeping the param storage's buffers as they were saved
        (torch would cast them to the param's dtype) and refusing a checkpoint of another
        mode (Note [param storage]) before anything is loaded. With a mode or a state_dtype,
        the scalar states (_scalar_state_keys) keep their saved dtype too: torch's cast of
        NAdam's mu_product to bfloat16, say, would change every later step. Without either,
        they are cast as torch.optim casts them, and the steps continue as torch's do.

        The load hooks run where torch's run them: the pre-hooks first, on the checkpoint as
        given (one may convert it, with to_torch_state_dict say), the post-hooks last, on the
        state as loaded, buffers and moments included."""
        # (torch's load would run the hooks on the stripped checkpoint below: it runs
        # without them, and they run here, as torch's own code runs them)
        state_dict = state_dict.copy()
        self._inference_states_possible = True  # (_refuse_inference_tensors)
        pre_hooks = self._optimizer_load_state_dict_pre_hooks
        post_hooks = self._optimizer_load_state_dict_post_hooks
        for pre_hook in pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        try:
            self._load_state_dict_kept(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks = pre_hooks
            self._optimizer_load_state_dict_post_hooks = post_hooks
        for post_hook in post_hooks.values():
            post_hook(self)

    def _load_state_dict_kept(self, state_dict: Dict[str, Any]) -> None:
        """load_state_dict's loading, without its hooks."""
        mode_key = getattr(self, "_storage_key", None)
        state_dtype = getattr(self, "_state_dtype", None)
        kept: Dict[Any, Dict[str, Tensor]] = {}
        stripped: Dict[Any, Dict[str, Any]] = {}
        dropped_scales = False
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        known = set(saved_ids)
        for pid, s in state_dict["state"].items():
            if pid not in known:
                # (the state of an id in no param group: torch's load keeps it as it is)
                stripped[pid] = s
                continue
            # (a uint8 moment is 8-bit, its scales there or not: torch.optim never keeps one)
            quantized = [k for k in self._moment_keys if isinstance(s.get(k), Tensor)
                         and s[k].dtype == torch.uint8]
            if quantized and state_dtype is not torch.uint8:
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: the state of param {pid} has 8-bit "
                    f"moments ('{quantized[0]}', state_dtype=torch.uint8), but this optimizer "
                    f"has state_dtype={state_dtype}: make it with state_dtype=torch.uint8, or "
                    "convert the checkpoint with fused_optim.to_torch_state_dict")
            # Note [state storage]: moments keep their saved dtype (torch's load would cast
            # them to the param's), converted after loading.
            keep = set(_STORAGE_OPTION)
            if state_dtype is not None:
                keep.update(self._moment_keys)
                keep.update(k + _ABSMAX for k in self._moment_keys)
                for k in self._moment_keys:  # (before anything is loaded: _convert_moments')
                    v = s.get(k)
                    if isinstance(v, Tensor) and v.dtype == torch.uint8 and k + _ABSMAX not in s:
                        raise ValueError(
                            f"{type(self).__name__}.load_state_dict: state '{k}' of param {pid} "
                            f"is 8-bit (uint8) but has no '{k}{_ABSMAX}' scales")
            # (what is not a tensor, an old SGD checkpoint's `momentum_buffer: None` say, goes
            # through torch's load as it is)
            ours = {k: v for k, v in s.items() if k in keep and isinstance(v, Tensor)}
            # (the scalar states go through torch's load too, whose hooks read them, and are
            # put back as saved after it)
            scalars = ({k: v for k, v in s.items() if k in self._scalar_state_keys
                        and isinstance(v, Tensor)}
                       if mode_key is not None or state_dtype is not None else {})
            for k in ours:
                if k in _STORAGE_OPTION and k != mode_key:
                    now = f"{self._storage_option}=True" if mode_key else (
                        "none of kahan_summation, stochastic_rounding, master_weights")
                    raise ValueError(
                        f"{type(self).__name__}.load_state_dict: the state of param {pid} has "
                        f"'{k}' ({_STORAGE_OPTION[k]}=True), but this optimizer has {now}: make "
                        f"it with {_STORAGE_OPTION[k]}=True to resume this checkpoint, or convert "
                        "the checkpoint with fused_optim.to_torch_state_dict")
                # (torch.optim's load casts the keys it does not know to the param's dtype:
                # a checkpoint loaded there without to_torch_state_dict and saved again has
                # bfloat16 master weights, a rounding state whose seed is lost; it loaded,
                # and the first step raised: found by a review, 2026-12-06)
                v = ours[k]
                if (k == "master_param" and v.dtype != torch.float32) or (
                        k == "rounding_state" and (v.dtype != torch.int64 or v.numel() not in (2, 3))):
                    raise ValueError(
                        f"{type(self).__name__}.load_state_dict: state '{k}' of param {pid} "
                        f"has dtype {v.dtype} and {v.numel()} elements, but "
                        f"{_STORAGE_OPTION[k]}=True keeps "
                        + ("float32 master weights" if k == "master_param" else
                           "an int64 [seed, counter] (or [seed, counter, offset])")
                        + ": was the checkpoint loaded into torch.optim, which casts it to its "
                        "param's dtype, without fused_optim.to_torch_state_dict?")
            # (an 8-bit checkpoint's moments kept in full precision, a small param's, load
            # into an optimizer without state_dtype as a float checkpoint's: their empty
            # scales, only a mark of the mode, are not put in its state)
            drop = keep if state_dtype is not None else keep | {
                k + _ABSMAX for k in self._moment_keys}
            stripped[pid] = {k: v for k, v in s.items()
                             if k not in drop or not isinstance(v, Tensor)}
            dropped_scales |= len(stripped[pid]) + len(ours) < len(s)
            if ours or scalars:
                kept[pid] = {**ours, **scalars}
        if not kept and not dropped_scales:
            super().load_state_dict(state_dict)
            return
        super().load_state_dict(dict(state_dict, state=stripped))
        params = [p for g in self.param_groups for p in g["params"]]
        by_id = dict(zip(saved_ids, params))
        for pid, ours in kept.items():
            p = by_id[pid]
            for k, v in ours.items():
                device = "cpu" if k == "rounding_state" else p.device
                # (Kahan's compensation is in its param's dtype: a checkpoint of bfloat16
                # params loaded onto float16 ones, say, has it converted, as the moments are)
                dtype = p.dtype if k == "kahan_comp" else None
                self.state[p][k] = v.to(device=device, dtype=dtype, copy=True)
            if state_dtype is not None:
                self._convert_moments(p, self.state[p])
        if mode_key == "rounding_state":
            # The seed the saving optimizer drew, from a saved param's own (p's seed is
            # _mix64(seed + p's position), a bijection): so a param that had not stepped
            # when the checkpoint was made starts the sequence it would have had.
            for position, p in enumerate(params):
                buf = self.state[p].get("rounding_state") if p in self.state else None
                if buf is not None:
                    self._rounding_seed = (_unmix64(int(buf[0])) - position) & _MASK64
                    break

    def _checked_state(self, group: Dict[str, Any], p: Tensor, grad: Tensor) -> Dict[str, Any]:
        """p's state, through _init_state; a new param's entry is made only once its
        checks pass (torch checks a grad before it touches the param's state: a failed step
        leaves no empty entry)."""
        state = self.state
        s = state[p] if p in state else {}
        made = len(s) != 0
        self._init_state(group, p, grad, s)
        if made:
            # (ours gathered every param's state before it looked a key up: a missing key
            # raised the same KeyError with the later params' state made too, found by a
            # differential fuzz, 2026-12-07)
            for key in self._torch_lookup_keys(group):
                if key not in s:
                    raise KeyError(key)
        if p not in state:
            state[p] = s
        return s

    def _init_state(self, group: Dict[str, Any], p: Tensor, grad: Tensor, state: Dict[str, Any]) -> None:
        """Creates p's state where it is missing, as torch's _init_group does, and raises
        torch's errors for grads it refuses. Runs on the general path only: the fast path
        takes a group only when all its state exists."""

    def _fused_dtype_check_once(self) -> None:
        """torch's SGD and Adagrad with fused=True check the first param with a grad of
        the first fused group at their first step (a complex param raises torch's
        RuntimeError), once per optimizer; so do these, before anything changes."""
        for group in self.param_groups:
            if not group["fused"]:
                continue
            for p in group["params"]:
                if p.grad is not None:
                    self._fused_device_check(p)
                    self._need_device_dtype_check_for_fused = False
                    return

    @staticmethod
    def _fused_device_check(p: Tensor) -> None:
        """torch's check of a fused group's first param (its device and dtype), as the
        installed torch's class makes it."""
        _device_dtype_check_for_fused(p)

    # Whether torch's step makes _fused_dtype_check_once's check (SGD, Adagrad).
    _checks_fused_once = False

    # The error torch's fused=True step raises for a complex param with a grad (beyond the
    # first param's check above), made from that param; None where torch raises none.
    _fused_complex_error: Optional[Callable[[Tensor], Exception]] = None
    # Whether torch's step refuses complex params (its _init_group raises; ours, _init_state).
    _refuses_complex = False

    def _check_fused_groups(self) -> None:
        """Raises _fused_complex_error for the first complex param with a grad of a fused
        group, before anything changes. Asked each step."""
        error = self._fused_complex_error
        if error is None:
            return
        for group in self.param_groups:
            if group.get("fused"):
                for p in group["params"]:
                    if p.grad is not None and p.is_complex():
                        raise error(p)

    def _sparse_grad_group(self) -> Optional[Dict[str, Any]]:
        """The first param group with a param whose grad is sparse, or None."""
        compiling = torch.compiler.is_compiling()
        for group in self.param_groups:
            params = group["params"]
            if compiling:
                sparse = any(p.grad is not None and p.grad.is_sparse for p in params)
            else:
                sparse = _C._has_sparse_grad(param_list(group))  # the same scan at C speed
            if sparse:
                return group
        return None

    def _torch_grads_reason(self) -> Optional[str]:
        """Why the grads of this step make it run torch's own implementation (sparse grads
        for some algorithms), or None. Asked only when the fast path declined."""
        compiling = torch.compiler.is_compiling()
        for group in self.param_groups:
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                subclass = None if compiling else next(filter(_dispatch_subclass, (p, g)), None)
                if subclass is not None:
                    # (a wrapper subclass such as torch's TwoTensor runs each op once per
                    # inner tensor: the op counted a step, and NAdam's mu_product and
                    # ASGD's eta, once per run; torch's for-loop counts them in plain
                    # tensors, once. Found by a review, 2026-12-06)
                    return f"a param or grad of the tensor subclass {type(subclass).__name__}"
                if not compiling and (p.is_conj() or p.is_neg()):
                    # (a lazy conjugate, `x.conj()`: the op's mutable lists cannot take one;
                    # torch's for-loop steps it in SGD and Adadelta and raises its own error
                    # in the others. Found by a review, 2026-12-06)
                    return "a param that is a lazy conjugate or negative view"
                if g.dtype != p.dtype and not g.is_sparse:
                    # (torch >= 2.9 allows it, with p.grad_dtype = None: torch's for-loop
                    # takes such grads in some algorithms, and raises its own error in others)
                    return "a grad whose dtype is not its param's"
                if p.dtype not in _KERNEL_DTYPES:
                    if p.is_complex() and self._refuses_complex:
                        # (torch's step would raise its "does not support complex
                        # parameters": _init_state raises it, without a warning that torch's
                        # step runs; found by a review, 2026-12-06)
                        continue
                    # (torch's for-loop steps complex32 params; for float8 or integer ones it
                    # raises its own error)
                    return f"a param of dtype {p.dtype}"
        return None

    def _refuse_torch_step(self, reason: str) -> None:
        """Raises: torch's own step, which would run `reason` (as the step's reason), keeps
        neither a param storage mode nor moments in state_dtype."""
        option = getattr(self, "_storage_option", None)
        what = (f"params with {option}=True" if option
                else f"moments with state_dtype={self._state_dtype}")
        raise RuntimeError(f"fused_optim.{type(self).__name__}: with {reason}, torch.optim's "
                           f"own step would run, which cannot keep {what}")

    def _torch_step_reason(self) -> Optional[str]:
        """Why the options make this step run torch's own implementation, or None."""
        compiling = torch.compiler.is_compiling()
        for group in self.param_groups:
            for option in self._torch_only_options:
                if group.get(option) and not (option == "capturable" and
                                              self._kernels_run_capturable(group, compiling)):
                    return f"{option}=True"
            # Note [hyper-parameters as Tensors of 1 dim]
            # torch's for-loops take a hyper-parameter given as a Tensor into their
            # arithmetic as a Tensor: of shape [1] (not 0-dim), most of them fail at the
            # first step, each with the error of the op it reaches (`add(): argument
            # 'alpha' must be Number, not Tensor`, `output with shape [] doesn't match the
            # broadcast shape [1]`, ...: SGD's weight_decay and dampening, NAdam's betas,
            # ASGD's lambd, alpha and t0, Adafactor's d, Muon's ns_coefficients, ...), and
            # AdamW's betas compute other values than their floats give. The kernels would
            # take the value. So such a group runs torch's own step, which computes or
            # raises as torch does, in any release (found by a differential fuzz,
            # 2026-12-07). The lr is the exception: a Tensor lr is torch's to take, of any
            # shape of one element, and the kernels take it as torch does. (Also where
            # torch would take the Tensor, eps or momentum say: it does only for params of
            # 1 or more dims.)
            for key in ("lr",) + self._numeric_hyper_parameters():
                value = group.get(key)
                if type(value) is float:
                    continue
                for v in (value if isinstance(value, (tuple, list)) else (value,)):
                    if key != "lr" and isinstance(v, Tensor) and v.dim() > 0:
                        return f"{key} given as a Tensor of shape {list(v.shape)}"
                    if compiling and is_numpy_scalar(v):
                        # (Dynamo traces a NumPy scalar, an lr that a LambdaLR returning
                        # np.cos(...) made, say, as an array: a FakeTensor, which the op's
                        # float argument refuses; torch's step computes with it. Found by a
                        # review, 2026-12-07.)
                        return f"{key} given as a NumPy scalar under torch.compile"
            if compiling and any(isinstance(b, Tensor) for b in group.get("betas", ())) and \
                    torch._dynamo.config.capture_scalar_outputs:
                # (the kernels take betas as floats: a traced .item() is a symbolic float
                # there, which the op's schema refuses; torch's step computes with them)
                return "Tensor betas under torch.compile with capture_scalar_outputs=True"
            if compiling and any(p.is_complex() for p in group["params"]):
                # (Inductor fails on the op's in-place update of complex tensors, "
                # auto_functionalized_v2 was not removed"; torch's step compiles)
                return "complex params under torch.compile"
        return None

    _NUMERIC_KEYS: Dict[type, Tuple[str, ...]] = {}

    def _numeric_hyper_parameters(self) -> Tuple[str, ...]:
        """The keys of the class's hyper-parameters that hold numbers (or tuples of them)
        other than the lr: those that torch's for-loop computes with (Note
        [hyper-parameters as Tensors of 1 dim])."""
        keys = FusedOptimizer._NUMERIC_KEYS.get(type(self))
        if keys is None:
            # (from the constructor's defaults: the class's, whatever an instance was given)
            signature = inspect.signature(type(self).__init__).parameters
            keys = tuple(k for k in self.defaults if k != "lr" and k in signature and (
                isinstance(signature[k].default, (tuple, list)) or (
                    isinstance(signature[k].default, (int, float))
                    and not isinstance(signature[k].default, bool))))
            FusedOptimizer._NUMERIC_KEYS[type(self)] = keys
        return keys

    def _whole_group_reason(self) -> Optional[str]:
        """Why an update of some of a group's params would depend on which others have
        grads (step in backward updates a bucket of them: backward.py), or None."""
        return None

    def _kernels_run_capturable(self, group: Dict[str, Any], compiling: bool) -> bool:
        """Whether our kernels run a capturable group (Note [capturable]): a CUDA group they
        can honour, and under torch.compile any other group, except a CUDA group of an
        algorithm whose CUDA kernels cannot be captured (NAdam, ASGD: the traced step made
        its steps on the GPU, which those kernels refuse; found by a review, 2026-12-06)."""
        if self._capturable_on_cuda(group):
            return True
        return compiling and (self._cuda_capturable
                              or not any(p.is_cuda for p in group["params"]))

    def _capturable_on_cuda(self, group: Dict[str, Any]) -> bool:
        """A capturable group our CUDA kernels can honour: CUDA params whose steps (where
        they exist) are on the GPU too. Otherwise torch's step runs and raises its own
        error (steps on the CPU would need a host synchronisation)."""
        if not self._cuda_capturable:
            return False
        state = self.state
        for p in group["params"]:
            if not p.is_cuda:
                return False
            step = state[p].get("step") if p in state else None
            if isinstance(step, Tensor) and step.device != p.device:
                return False
        return True

    # -- the step ------------------------------------------------------------------------
    def step(self, closure: Optional[Callable[[], float]] = None):  # type: ignore[override]
        """Perform a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model
                and returns the loss.
        """
        if self._capture_check is not None:
            # (as torch's step: a CUDA graph capture of a group that is not capturable is
            # refused)
            getattr(self, self._capture_check)()
        if not torch.compiler.is_compiling() and torch.is_inference_mode_enabled():
            self._inference_states_possible = True  # (_refuse_inference_tensors)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # (torch's SGD and Adagrad take a missing flag as set: a deepcopy or an unpickled
        # optimizer checks again, and so does one made before `fused` was set on a group)
        if getattr(self, "_need_device_dtype_check_for_fused", self._checks_fused_once):
            self._fused_dtype_check_once()
        self._check_fused_groups()
        for group in self.param_groups:
            self._refuse_group_options(group)
        # Decided after the closure: the grads it makes (sparse ones, say) are the ones the
        # step sees.
        reason = self._torch_step_reason()
        storage = getattr(self, "_param_mode", 0)
        state_dtype = getattr(self, "_state_dtype", None)
        if reason is None and (storage or state_dtype is not None):
            reason = self._torch_grads_reason()  # (looked at later otherwise)
        if reason is not None and (storage or state_dtype is not None):
            self._refuse_torch_step(reason)
        # Set by GradScaler.step() for optimizers with _step_supports_amp_scaling.
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = self._scalers_found_inf()
        groups = self.param_groups
        scales = [grad_scale] * len(groups)
        if getattr(self, "max_grad_norm", None) is not None:
            if reason is not None:
                self._warn_torch_step(reason)
            scales, self._last_grad_norm[0] = clip_in_step(self, grad_scale, found_inf,
                                                           fold=reason is None)
        if reason is not None:
            self._torch_step(reason, scales)
            return loss
        keys = [self._step_keys(group) for group in groups]
        args = [_ops.schema_args(self._op, self._step_kwargs(group), scale, found_inf)
                for group, scale in zip(groups, scales)]
        # Note [fast path]: in eager mode, _C._step gathers the groups' lists in C++ and
        # calls the CPU or CUDA kernel directly (Note [direct calls] in
        # csrc/direct_call.h). It declines, changing nothing, whatever it does not take
        # (first steps that create state, sparse grads, DTensors and other subclasses,
        # a group on several devices, a CUDA group with lr / grad_scale / found_inf on the
        # GPU, active torch function or dispatch modes); then the grads are looked at for
        # a reason to run torch's step, and each group takes the fast path or the general
        # one below, through the op. (Of grads it declines the subclasses the dispatcher
        # sees, __torch_dispatch__ ones: a grad subclass that overrides only
        # __torch_function__ is read as a plain tensor, docs/parity.md.)
        fast = self._fast_path and not torch.compiler.is_compiling()
        modes = bool(storage) or state_dtype is not None
        try:
            with torch.no_grad():
                done = fast and _C._step(self._op, [param_list(g) for g in groups], self.state,
                                         keys, args)
        except (RuntimeError, ValueError, TypeError):
            # (every group checked before any changed: Note [every group checked first] in
            # csrc/plan.h; a param whose dtype a mode does not take gets the error that
            # names its group and index)
            if modes:
                self._check_storage_dtypes_of_every_group()
            raise
        if done:
            return loss
        reason = self._torch_grads_reason()
        if reason is not None:
            # (Clipping may have folded its coefficient into a group's scale: float32 grads
            # of 16-bit params, p.grad_dtype = torch.float32, are folded, and this reason
            # is theirs. _torch_step applies each group's scale before torch's step: until
            # 2026-12-06 it took the first group's, and only under a GradScaler, so such a
            # step went unclipped.)
            self._torch_step(reason, scales)
            return loss
        if (found_inf is not None and not torch.compiler.is_compiling()
                and not (found_inf.is_cuda and torch.cuda.is_current_stream_capturing())
                and self._makes_state(groups, keys) and found_inf.item() != 0):
            # A GradScaler's skipped step that would make state: torch's for-loop is not
            # called at all, and makes none. The kernels skip the update, but the state was
            # made first, with the lr of that moment where a state keeps it (Rprop's
            # step_size, ASGD's eta): a later first real step under another lr (a
            # scheduler's) then stepped otherwise (found by a review, 2026-12-06). (Only
            # where a state would be made, by a group that keeps one (SGD without momentum
            # keeps none): reading found_inf synchronises on a GPU, and is not allowed in a
            # CUDA graph capture. Under torch.compile the state is made: docs/parity.md.)
            return loss
        # Group by group only where there are several: a single group was just declined.
        retry = fast and len(groups) > 1
        if modes:  # (before any group is updated: a param's dtype may have changed)
            self._check_storage_dtypes_of_every_group()
        with torch.no_grad():
            for group, group_keys, group_args in zip(groups, keys, args):
                if retry and _C._step(self._op, [param_list(group)], self.state, [group_keys],
                                      [group_args]):
                    continue
                params: List[Tensor] = []
                grads: List[Tensor] = []
                for p in group["params"]:
                    g = p.grad
                    if g is not None:
                        params.append(p)
                        grads.append(g)
                if params:
                    self._update_placing_state(group, params, grads, group_keys, group_args)
                    bump_versions(params)
        return loss

    def _makes_state(self, groups: List[Dict[str, Any]],
                     keys: List[Tuple[Optional[str], ...]]) -> bool:
        """Whether a step would make state: a param with a grad and no state yet, or
        without the state its group's param_aux keeps (a storage mode's buffer, the 8-bit
        moments' scales), in a group whose kernel takes a state (its keys). (Adagrad's
        state is made by its constructor, with a mode's buffer since 2026-12-08: that buffer
        is left to make only after a torch.optim checkpoint's load, or for a param added
        since; a skipped first step had made it, where unscale_ then a skipped step() makes
        nothing; found by a fuzz, 2026-12-07. Not every rule key: Adafactor keeps
        `variance` or the row and column ones, and a GPU step would wait on found_inf.)"""
        state = self.state
        for group, group_keys in zip(groups, keys):
            if not any(k is not None for k in group_keys):
                continue
            aux = self._aux_keys(self._state_keys(group))
            for p in group["params"]:
                if p.grad is not None:
                    s = state.get(p)
                    if not s or any(k not in s for k in aux):
                        return True
        return False

    def _update_placing_state(self, group: Dict[str, Any], params: List[Tensor],
                              grads: List[Tensor], keys: Tuple[Optional[str], ...],
                              args: Tuple[Any, ...]) -> None:
        """_update_group, with the state it makes side by side (Note [small states side by
        side]): the zero tensors as they are made, the others copied after the update."""
        # A grad that is a lazy conjugate (autograd leaves one for a complex param used
        # through p.conj()) or negative view: its values, which torch's ops read (the op's
        # mutable grad lists cannot take such views). (Under torch.compile the graph has
        # no such views, and is_conj() would break it.)
        global _cpu_choices_made
        state = self.state
        if not torch.compiler.is_compiling():
            grads = [g.resolve_conj().resolve_neg() if g.is_conj() or g.is_neg() else g
                     for g in grads]
            if not _cpu_choices_made:
                # The CPU loops' choices (Note [CPU tuning]), once per process, before a
                # kernel counts a step: a bad FUSED_OPTIM_* value raises here.
                torch.ops.fused_optim._cpu_isa()
                torch.ops.fused_optim._cpu_tuning()
                _cpu_choices_made = True
            if not torch.is_inference_mode_enabled():
                self._refuse_inference_tensors(params)
        fresh = [p for p in params if not state.get(p)]
        plain = getattr(self, "_state_dtype", None) is None  # (else converted once made)
        with self._state_arena(fresh if plain else []) as arena:
            self._update_group(group, params, grads, keys, args)
        if fresh:
            self._side_by_side(fresh, skip=arena.served())

    def _refuse_inference_tensors(self, params: List[Tensor]) -> None:
        """A param or state made under torch.inference_mode(): torch refuses to update it
        in place outside inference mode (its error comes after its update; ours before: a
        no-op update of the first such tensor raises it). The fast path leaves such tensors
        to the general path (is_plain_writable in csrc/python_step.cpp). The params are
        looked at each time; the states only where a step ran in inference mode or a
        checkpoint was loaded since the last look (a look costs about 0.5 us a param)."""
        inference = next(filter(Tensor.is_inference, params), None)
        if inference is not None:
            inference.add_(0)
        if not self.__dict__.get("_inference_states_possible", False):
            return
        state = self.state
        for p in params:
            for t in (state.get(p) or {}).values():
                if isinstance(t, Tensor) and t.is_inference():
                    t.add_(0)
        self._inference_states_possible = False

    def _state_arena(self, params: List[Tensor]) -> "_StateArena":
        """Note [small states side by side]: where the zero states of `params` are made
        while a step makes them."""
        return _StateArena(params)

    def _side_by_side(self, params: List[Tensor], skip: Tuple[str, ...] = ()) -> None:
        """Note [small states side by side]: the state tensors of `params` that qualify,
        but for the keys in `skip` (made side by side already), copied into one allocation
        per key, in the order of `params`."""
        if torch.compiler.is_compiling():
            return
        state = self.state
        by_key: Dict[str, List[Tuple[Dict[str, Any], Tensor]]] = {}
        for p in params:
            if not _side_by_side_eligible(p):
                continue
            s = state.get(p)
            for key, v in (s.items() if s else ()):
                if (key not in skip and _side_by_side_eligible(v) and v.shape == p.shape
                        and not v.requires_grad):
                    by_key.setdefault(key, []).append((s, v))
        picks = [(s, key, v) for key, entries in by_key.items() if len(entries) > 1
                 for s, v in entries]
        if not picks:
            return
        copies = torch.ops.fused_optim._side_by_side([v for _, _, v in picks], True)
        for (s, key, _), copy in zip(picks, copies):
            s[key] = copy

    def _update_group(
        self,
        group: Dict[str, Any],
        params: List[Tensor],
        grads: List[Tensor],
        keys: Tuple[Optional[str], ...],
        args: Tuple[Any, ...],
    ) -> None:
        """The general path: creates missing state, gathers the lists in Python and runs
        the op (through the dispatcher, so torch.compile, modes and subclasses see it)."""
        state = self.state
        lists: Tuple[List[Tensor], ...] = tuple([] for _ in keys)
        storage = getattr(self, "_param_mode", 0)
        moments = getattr(self, "_state_dtype", None) is not None
        pending: List[Tuple[Tensor, Tensor]] = []
        if moments:
            _moment_form.form = (self._state_dtype, self._moment_keys)
        try:
            states = [self._checked_state(group, p, g) for p, g in zip(params, grads)]
        finally:
            _moment_form.form = None
        for p, s in zip(params, states):
            if storage:
                self._init_storage(p, s)
            if moments:
                self._convert_moments(p, s)
            for tensors, key in zip(lists, keys):
                if key is not None:
                    t = s[key]
                    if not isinstance(t, Tensor) and key != "step":
                        # (None or a number put in by hand or by a checkpoint: torch's
                        # arithmetic raises an AttributeError on it, "'NoneType' object has
                        # no attribute 'lerp_'"; the op's schema check raised a RuntimeError
                        # that printed every tensor of the list: found by a review,
                        # 2026-12-06. A Python number as `step`: docs/parity.md.)
                        raise AttributeError(
                            f"'{type(t).__name__}' object has no tensor methods: "
                            f"fused_optim.{type(self).__name__}'s state['{key}'] of a param "
                            f"must be a tensor, as torch.optim.{self._torch_class.__name__}"
                            f"'s step needs it")
                    if type(p) is not Tensor and type(p) is not torch.nn.Parameter:
                        # a DTensor's scales and rounding state as the kernel takes them:
                        # Note [8-bit DTensors], Note [stochastic rounding]
                        if key.endswith(_ABSMAX):
                            t = quantization.kernel_scales(t, s[key[: -len(_ABSMAX)]])
                        elif key == self._storage_key:
                            t = self._kernel_storage(p, t, pending)
                    tensors.append(t)
        _ops.call(self._op, params, grads, lists, args)
        self._storage_done(pending)

    def _scalers_found_inf(self) -> Optional[Tensor]:
        """The found_inf a GradScaler set on us (we claim amp support), as a Tensor. Where no
        param has a grad, GradScaler.step hands over sum([]) of its per-device flags, the
        int 0: torch's fused=True step then does nothing, where ours raised an
        AttributeError (found by a differential fuzz, 2026-12-07)."""
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and not isinstance(found_inf, Tensor):
            found_inf = torch.tensor(float(found_inf))
        return found_inf

    def _warn_torch_step(self, reason: str) -> None:
        """The one-time warning that torch's own step runs, for `reason`. Given before
        anything changes (clipping writes the grads): where warnings are errors, the step
        raises it with nothing done, and again at the next step."""
        key = (type(self).__name__, reason)
        if key in FusedOptimizer._warned:
            return
        if reason == "capturable=True" and all(
                p.device.type == "cpu" for g in self.param_groups for p in g["params"]):
            return  # torch's step raises its error for CPU params: nothing to warn about
        warn(f"fused_optim.{type(self).__name__}: the fused kernels do not support {reason}; "
             f"running torch.optim.{self._torch_class.__name__}'s implementation instead.")
        FusedOptimizer._warned.add(key)

    def _torch_step(self, reason: str, scales: List[Optional[Tensor]]) -> None:
        """torch.optim's own step (the closure has run), for what the kernels do not do.
        `scales`: each group's grad_scale as the kernel would take it (Note [clipping in the
        step]): the scaler's scale, clipping's folded one (1 / scale is the factor the
        grads are multiplied by), or None where the grads are unscaled and clipped already
        or there is nothing to do."""
        self._warn_torch_step(reason)
        saved_scale = getattr(self, "grad_scale", None)
        found_inf = self._scalers_found_inf()
        # torch's step, unwrapped: our own step already ran the step hooks once (the
        # wrapper that runs them is on torch's class once a torch optimizer of that class
        # exists, under the one that sets the grad mode).
        raw_step = inspect.unwrap(self._torch_class.step)

        def torch_step(opt: "FusedOptimizer") -> None:
            # As torch's own decorators run it (_use_grad_for_differentiable, or no_grad
            # where the class has no `differentiable`): the in-place updates of leaf
            # params need grad mode off, unless differentiable=True. (Not bool(): a truthy
            # differentiable that is not a bool raises torch's TypeError here, before its
            # step changes anything, as torch's decorator does; found by a fuzz, 2026-12-07.
            # A falsy one, 0 or None, steps, as the kernels' steps do: docs/parity.md.)
            with torch.set_grad_enabled(opt.defaults.get("differentiable", False) or False):
                raw_step(opt)

        if saved_scale is None and found_inf is None and all(s is None for s in scales):
            torch_step(self)
            return
        # A GradScaler gave us the scale (we claim amp support), or clipping folded its
        # coefficient into one; torch's non-fused path expects unscaled, clipped grads and
        # no scaler attributes, as GradScaler.unscale_ and clip_grad_norm_ would leave them.
        if found_inf is not None and found_inf.item() != 0:
            return
        try:
            self.grad_scale = self.found_inf = None
            with torch.no_grad():
                for group, scale in zip(self.param_groups, scales):
                    if scale is None:
                        continue
                    factor = scale.double().reciprocal().float()
                    for p in group["params"]:
                        if p.grad is not None:
                            p.grad.mul_(factor.to(p.grad.device))
            torch_step(self)
        finally:
            self.grad_scale, self.found_inf = saved_scale, found_inf


def lr_args(lr) -> Dict[str, Any]:
    """The kernels' lr arguments: a float lr as `lr`, a Tensor lr as `lr_tensor` (read by
    the kernel itself, so a compiled step needs no host synchronisation)."""
    if isinstance(lr, Tensor):
        return {"lr": 0.0, "lr_tensor": lr}
    return {"lr": lr, "lr_tensor": None}


def hyper_float(value, name: str) -> float:
    """A hyper-parameter given as a number or a 1-element tensor, as a Python float. A
    string (a config file's '1e-4', say) raises a TypeError, as torch's step raises one in
    its arithmetic: float() had made it a number (found by a review, 2026-12-06)."""
    if isinstance(value, Tensor):
        return value.item()
    _ops.check_number(name, value)
    return float(value)


def weight_decay_arg(group: Dict[str, Any], decoupled: Any = False) -> float:
    """A group's weight_decay for the kernel. Where torch's step adds it to the grad as
    `grad.add(param, alpha=weight_decay)` (not decoupled), a bool True, which the
    constructors accept (0.0 <= True), raises torch's error there; ours stepped with 1.0
    (found by a review, 2026-12-06). Decoupled, torch multiplies the param by 1 - lr *
    weight_decay, and True is 1."""
    value = group["weight_decay"]
    if not decoupled and not group.get("fused") and (
            value is True or (isinstance(value, Tensor) and value.dtype == torch.bool
                              and value.numel() == 1 and bool(value))):
        # (a 0-dim True tensor too; torch's fused kernels take it as 1, and so do ours:
        # found by a review of the fix, 2026-12-06)
        raise RuntimeError("Boolean alpha only supported for Boolean results.")
    return hyper_float(value, "weight_decay")


def _check_rounding_placements(p: Tensor, i: int, index: int) -> None:
    """Stochastic rounding numbers a DTensor's local elements from the position of its
    shard's first element in the whole param (_kernel_storage): right where the whole param
    is contiguous and every shard is a range of its rows, as FSDP2's default Shard(0) makes
    them, nested (HSDP's Replicate, Shard(0); Shard(0) on two mesh dims) or not, and as FSDP2
    over tensor or expert parallelism makes them, (_StridedShard(0, split_factor=n),
    Shard(0)) with the later dims' mesh sizes multiplying to n: the later shard's chunk is
    taken first, the strided one's inside it. A shard of another dim (FSDP2's
    shard_placement_fn=Shard(1)) is a box whose rows lie apart in the whole param, and a
    non-contiguous param's shard is no range of its positions: their elements would take
    other elements' random numbers (shards sharing them, the sharded step not the unsharded
    one's: found by a differential fuzz, 2026-12-08). Refused, on every rank alike: decided
    from the placements and the layout, which every rank shares, not from a rank's shard."""
    from torch.distributed.tensor import Replicate, Shard

    placements = tuple(p.placements)
    sizes = tuple(p.device_mesh.shape)
    ok = p.is_contiguous()
    for k, placement in enumerate(placements):
        if not ok:
            break
        if type(placement) is Replicate or (type(placement) is Shard and placement.dim == 0):
            continue
        if (type(placement).__name__ == "_StridedShard" and placement.dim == 0):
            later = 1
            for j in range(k + 1, len(placements)):
                if isinstance(placements[j], Shard) and placements[j].dim == 0:
                    later *= sizes[j]
            if getattr(placement, "split_factor", None) == later:
                continue
        ok = False
    if not ok:
        raise ValueError(
            f"stochastic_rounding=True takes DTensor params sharded on dim 0 (Shard(0), FSDP2's "
            f"default) or replicated, and contiguous; param {i} of param group {index} has "
            f"placements {placements}{'' if p.is_contiguous() else ' and is not contiguous'}: "
            "its shards' elements would not draw the random numbers of their positions in the "
            "whole param (shard it on dim 0, or put it in an optimizer without "
            "stochastic_rounding)")


def betas_args(group: Dict[str, Any]) -> Dict[str, float]:
    """The kernels' beta1 and beta2 from a group's `betas` (floats or 1-element tensors)."""
    beta1, beta2 = group["betas"]
    return {"beta1": hyper_float(beta1, "betas[0]"), "beta2": hyper_float(beta2, "betas[1]")}


def raise_as_torchs_host_division(group: Dict[str, Any], state: Dict[Tensor, Any],
                                  beta: Any, term: Callable[[Any], Any]) -> None:
    """torch's for-loop computes some coefficients from the hyper-parameters as Python
    numbers (Adam's and Adamax's lr / (1 - beta1 ** step), RAdam's 2 / (1 - beta2) - 1),
    and a beta set to 1 (or -1) in a param group, which the constructors refuse, makes it
    raise ZeroDivisionError there. So does ours, before anything changes (torch's part way
    through the group), by evaluating the same expression: `term(step)` for each step the
    group's params with a grad take now, only where `beta` is 1 or -1 (the betas whose
    powers can be exactly 1). NumPy numbers or tensors divide without raising, as in
    torch."""
    if isinstance(beta, Tensor) or not (beta == 1 or beta == -1):
        return
    evaluate_host_term(group, state, term)


def host_steps(group: Dict[str, Any], state: Dict[Tensor, Any]):
    """(the param's state or None, the step it takes now as a float) for each param of the
    group with a grad: what torch's for-loop computes its host terms from."""
    for p in group["params"]:
        if p.grad is not None:
            s = state.get(p)
            step = s.get("step") if s else None
            yield s, (float(step) if step is not None else 0.0) + 1.0


def evaluate_host_term(group: Dict[str, Any], state: Dict[Tensor, Any],
                       term: Callable[[Any], Any]) -> None:
    """`term(step)` for the step each param of the group with a grad takes now, as torch's
    for-loop evaluates it (raising where it raises), before anything changes. The callers
    ask only where the hyper-parameters can make it raise."""
    for _, step in host_steps(group, state):
        term(step)


def _side_by_side_eligible(t: Tensor) -> bool:
    """Whether a param, or a state tensor, is one Note [small states side by side] lays
    side by side: a plain contiguous CPU tensor of 1 to _SIDE_BY_SIDE_MAX elements."""
    return ((type(t) is Tensor or type(t) is torch.nn.Parameter) and t.device.type == "cpu"
            and t.layout == torch.strided and t.dim() > 0
            and 0 < t.numel() <= _SIDE_BY_SIDE_MAX and t.is_contiguous())


class _StateArena:
    """Note [small states side by side]: while a step makes new params' state (the
    context), the zero state tensors of the params that qualify, made side by side, one
    allocation per key the first time a key is asked for."""

    _current = threading.local()

    def __init__(self, params: List[Tensor]):
        self._params = ([p for p in params if _side_by_side_eligible(p)]
                        if not torch.compiler.is_compiling() else [])
        self._ids = {id(p) for p in self._params} if len(self._params) > 1 else set()
        self._made: Dict[str, Dict[int, Tensor]] = {}

    def __enter__(self) -> "_StateArena":
        self._outer = getattr(_StateArena._current, "arena", None)
        _StateArena._current.arena = self if self._ids else None
        return self

    def __exit__(self, *exc) -> None:
        _StateArena._current.arena = self._outer

    @staticmethod
    def zeros_like(p: Tensor, key: str) -> Optional[Tensor]:
        """p's zero `key` tensor from the arena in force, or None (none, or p not in it)."""
        arena = getattr(_StateArena._current, "arena", None)
        if arena is None or id(p) not in arena._ids:
            return None
        made = arena._made.get(key)
        if made is None:
            zeros = torch.ops.fused_optim._side_by_side(arena._params, False)
            made = arena._made[key] = {id(q): t for q, t in zip(arena._params, zeros)}
        return made.pop(id(p), None)

    def served(self) -> Tuple[str, ...]:
        """The keys whose every tensor went to a param."""
        return tuple(key for key, left in self._made.items() if not left)


# While FusedOptimizer._update_group makes state with a state_dtype: (state_dtype, the
# moment keys), so that zeros_states makes new moments in that form at once.
_moment_form = threading.local()


def zeros_states(state: Dict[str, Any], p: Tensor, *keys: str) -> None:
    """state[key] = zeros like p (its dtype, device and strides) for each key, as torch's
    _init_group makes the moments; side by side with the other new params' where a step
    makes them (Note [small states side by side]). Under a state_dtype (Note [state
    storage]), the moments are made in its form directly (8-bit codes and scales of zeros,
    as quantizing float32 zeros gives them, without the temporaries)."""
    form = getattr(_moment_form, "form", None)
    for key in keys:
        if form is not None and key in form[1] and type(p) in (Tensor, torch.nn.Parameter):
            if form[0] is torch.uint8 and quantization.quantizes(p):
                state[key], state[key + _ABSMAX] = quantization.zeros(p)
            else:  # (8-bit state keeps a small or strided param's moments in float32)
                dtype = torch.float32 if form[0] is torch.uint8 else form[0]
                state[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            continue
        t = _StateArena.zeros_like(p, key)
        state[key] = t if t is not None else torch.zeros_like(
            p, memory_format=torch.preserve_format)


def scalar_state(value: float, p: Tensor, capturable: bool) -> Tensor:
    """A 0-dim float32 state entry (`step`, NAdam's `mu_product`, ...), as the _init_group
    of torch's newer optimizers makes it: on the CPU (the for-loop reads it on the host),
    on the param's device where the group is capturable."""
    if capturable:
        return torch.full((), value, dtype=_get_scalar_dtype(), device=p.device)
    return torch.tensor(value, dtype=_get_scalar_dtype())
