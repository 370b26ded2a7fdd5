"""Step in backward: each param's update runs during backward, as soon as its grad is
accumulated, and the grad is freed then (docs/integrations.md#step-in-backward).

    handle = fused_optim.step_in_backward(opt)
    for batch in loader:
        loss_fn(model(batch)).backward()   # most params are updated here
        opt.step()                         # the rest, and the end of the iteration
        sched.step()
        opt.zero_grad()

Note [step in backward]
A post-accumulate-grad hook on every param puts the param in a pending bucket; when the
bucket's grads reach bucket_cap_mb, the optimizer's kernel runs on exactly those params
(one call per param group, with the group's hyper-parameters as they are at that moment)
and their grads are set to None. A bucket trades the per-call cost of many small params
against the memory its grads hold. The optimizer stays the one object it was:
param_groups, state, state_dict, LR schedulers and checkpoints are untouched. Its step()
(wrapped on the instance) ends an iteration: it runs the optimizer's own step, which finds
grads on the pending params only (the others were updated and freed), so nothing is
updated twice; torch's step hooks and schedulers see one step() per iteration as before.

Every update is elementwise and per tensor (a tensor's coefficients come from its own step),
and the kernels' result does not depend on where a vector or thread boundary falls (Note
[matching torch.optim bit for bit] in csrc/update_rules.h), so params and state are bitwise
those of backward-then-step, whatever the buckets.

What cannot be combined with it is refused before anything is written where that can be
seen in time: a second backward reaching a param before step() (gradient accumulation, unless
accumulation_steps says so), clipping by the global grad norm (it needs every grad first),
options that run torch's own step (differentiable=True, ...), sparse grads, a closure, and
torch.distributed with several processes (DDP all-reduces a grad after its hook has run).
A GradScaler is seen only by step(), after the iteration's updates ran: step() raises then.
"""
import contextlib
import os
import threading
import types
import weakref
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from . import _C, _ops
from ._warnings import warn
from .optimizer import FusedOptimizer, bump_versions

__all__ = ["step_in_backward", "StepInBackward"]

_MISSING = object()

# The live handles, for _locks_anew_after_fork.
_HANDLES: "weakref.WeakSet[StepInBackward]" = weakref.WeakSet()


def _locks_anew_after_fork() -> None:
    """A child forked while another thread of the parent held a handle's lock (inside a
    backward's hook or step()) inherits it held by a thread it does not have: its first
    hook waited for good (found by a review, 2026-12-06). Each live handle gets a new lock
    in the child, as the logging module renews its own; and where that thread was inside
    step() (which the child has no thread to finish), the child is not: its first
    backward was refused as one inside step() (found by a second review). (The child's
    iteration is then the parent's unfinished one: optimizer.zero_grad() starts its own,
    as after a backward that raised part way.)"""
    for handle in list(_HANDLES):
        handle._lock = threading.RLock()
        handle._stepping = False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_locks_anew_after_fork)


def step_in_backward(optimizer: FusedOptimizer, *, bucket_cap_mb: float = 25.0,
                     accumulation_steps: int = 1) -> "StepInBackward":
    """Runs `optimizer`'s update of each param during backward, as soon as its grad is
    accumulated, and frees the grad. Returns a handle; `handle.remove()` (or leaving a
    `with` block) restores the usual backward-then-step.

    The training loop stays `loss.backward(); opt.step(); sched.step(); opt.zero_grad()`:
    step() updates what backward left pending (the last bucket) and ends the iteration.
    Params, state and state_dict are bitwise those of backward-then-step.

    Args:
        optimizer: a fused_optim optimizer (any algorithm), all of its param groups.
        bucket_cap_mb: the grads, in MiB, that wait for one update call; 0 updates each
            param on its own. Larger buckets mean fewer calls and more grad memory held.
        accumulation_steps: the number of backwards whose grads accumulate before the
            update, which runs during the last of them; step() after it ends the cycle (a
            step() after fewer backwards updates with what was accumulated, as torch.optim
            does). With 1, a second backward before step() is refused.

    Raises:
        TypeError: `optimizer` is not a fused_optim optimizer.
        RuntimeError: what cannot be combined with it (see docs/integrations.md).
    """
    return StepInBackward(optimizer, bucket_cap_mb=bucket_cap_mb,
                          accumulation_steps=accumulation_steps)


def _hyper_parameters(group: Dict[str, Any]) -> Dict[str, Any]:
    """A param group's entries but its params, Tensors copied (a scheduler updates a Tensor
    lr in place): Note [hyper-parameters in step in backward]."""
    return {k: _copied(v) for k, v in group.items() if k not in ("params", "param_names")}


def _copied(v: Any) -> Any:
    if isinstance(v, Tensor):
        return v.detach().clone()
    if isinstance(v, (tuple, list)):
        return type(v)(_copied(x) for x in v)
    return v


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b)))
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return (type(a) is type(b) and len(a) == len(b)
                and all(_same_value(x, y) for x, y in zip(a, b)))
    try:
        return bool(a == b) or (a != a and b != b)  # (a NaN is the NaN it was)
    except Exception:  # (values whose comparison raises: compared by identity)
        return a is b


def _shared_storage(params: List[Tensor]) -> Dict[Tensor, Tuple[Tensor, ...]]:
    """Note [params sharing memory in step in backward]: each param that shares its storage
    with another param (views of one flat buffer, `nn.Parameter(flat[a:b].view(shape))`),
    mapped to all the params of that storage."""
    by_storage: Dict[int, List[Tensor]] = {}
    for p in params:
        if p.numel() == 0 or p.device.type == "meta" or type(p) not in (Tensor,
                                                                       torch.nn.Parameter):
            continue  # (a subclass's storage, a DTensor's say, is not its own to read)
        by_storage.setdefault(p.untyped_storage().data_ptr(), []).append(p)
    return {p: tuple(members) for members in by_storage.values() if len(members) > 1
            for p in members}


def _restore(opt: Any, name: str, ours: Any, previous: Any) -> None:
    """Puts back the instance attribute `name` that `ours` replaced (none, if there was
    none; `previous` as _unbind keeps it), where `ours` is still the one there."""
    if opt.__dict__.get(name) is ours:
        if previous is _MISSING:
            delattr(opt, name)
        else:
            setattr(opt, name, _rebind(previous, opt))


# Note [what step in backward holds]
# The optimizer holds its handle (_fused_step_in_backward: a handle nobody keeps, as in
# `step_in_backward(opt)`, works as long as the optimizer does); nothing holds the optimizer
# back: the handle reaches it through a weak reference, the params' hooks reach the handle
# through one, and the step() and zero_grad() put on the optimizer keep its previous methods
# unbound. So an optimizer dropped without remove() is freed when its last reference goes,
# with its handle, whose finalizer takes the hooks off the params; until 2026-12-06 the
# references made cycles, and the dropped optimizer went on updating the model during
# backward (and taking its grads) until Python's cycle collector ran, then left a dead hook
# on each param for good (found by a review). And a handle kept after remove() keeps
# nothing alive.
def _unbind(f: Any, opt: Any) -> Any:
    """f, without a strong reference to opt where it is a method bound to opt."""
    if isinstance(f, types.MethodType) and f.__self__ is opt:
        return (_BOUND, f.__func__)
    return f


def _rebind(f: Any, opt: Any) -> Any:
    if isinstance(f, tuple) and len(f) == 2 and f[0] is _BOUND:
        return types.MethodType(f[1], opt)
    return f


_BOUND = object()


def _remove_hooks(hooks: Dict[Tensor, Any]) -> None:
    for hook in hooks.values():
        hook.remove()
    hooks.clear()


class StepInBackward:
    """The handle of step_in_backward: remove() takes the hooks off and restores step()."""

    def __init__(self, optimizer: FusedOptimizer, *, bucket_cap_mb: float = 25.0,
                 accumulation_steps: int = 1) -> None:
        if not isinstance(optimizer, FusedOptimizer):
            raise TypeError(
                "fused_optim.step_in_backward takes a fused_optim optimizer (fused_optim.AdamW, "
                f"...), got {type(optimizer).__module__}.{type(optimizer).__qualname__}")
        if isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, (int, float)) \
                or not bucket_cap_mb >= 0:
            raise ValueError(f"bucket_cap_mb must be a number >= 0, got {bucket_cap_mb!r}")
        if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) \
                or accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be an int >= 1, got {accumulation_steps!r}")
        other = getattr(optimizer, "_fused_step_in_backward", None)
        if other is not None and other._active:
            raise RuntimeError(
                "fused_optim.step_in_backward: this optimizer already runs its step in backward; "
                "remove() the first handle before making another")
        self._optimizer = weakref.ref(optimizer)  # Note [what step in backward holds]
        self._cap_bytes = bucket_cap_mb * 2**20
        self._accumulation_steps = accumulation_steps
        self._check_combinable()
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            raise RuntimeError(
                "fused_optim.step_in_backward does not support torch.distributed with several "
                "processes: DistributedDataParallel all-reduces a grad after the hook that would "
                "update its param has run, so each rank would update with its own grads")
        # (reentrant: a step hook may call zero_grad() or remove(), which take it too; a
        # backward inside step() is refused in _on_grad: with a plain lock it hung, found by
        # a review, 2026-12-06)
        self._lock = threading.RLock()
        _HANDLES.add(self)
        self._stepping = False  # step() is running the iteration's last updates
        self._active = True
        # The params whose grads arrived since the last step(), with how many backwards
        # reached each; the ones waiting for an update call, and their grads' bytes.
        self._counts: Dict[Tensor, int] = {}
        self._pending: List[Tensor] = []
        self._pending_bytes = 0
        self._hooks: Dict[Tensor, Any] = {}
        # (the handle freed without remove(), with its optimizer: the hooks taken off)
        self._finalizer = weakref.finalize(self, _remove_hooks, self._hooks)
        self._group_of: Dict[Tensor, int] = {}
        self._layout: Optional[tuple] = None
        self._no_grad_params: List[Tensor] = []
        # Note [params sharing memory in step in backward]
        self._shared: Dict[Tensor, Tuple[Tensor, ...]] = {}
        # The groups' hyper-parameters as this iteration's first update used them (Note
        # [hyper-parameters in step in backward])
        self._hyper: Optional[List[Dict[str, Any]]] = None
        # The params' hook reaches the handle through a weak reference: a strong one would
        # make a cycle through the hooks torch keeps in C++ (param -> hook -> handle ->
        # optimizer -> param), which its collector cannot free, so a handle never removed
        # kept the model and the optimizer's state alive for good. (The optimizer holds
        # the handle: _fused_step_in_backward.)
        handle = weakref.ref(self)

        def hook(p: Tensor) -> None:
            h = handle()
            if h is not None:
                h._on_grad(p)

        self._hook = hook
        self._track_params()
        self._install_step()
        optimizer._fused_step_in_backward = self

    @property
    def optimizer(self) -> Optional[FusedOptimizer]:
        """The optimizer (None once it has been freed: the handle does not keep it)."""
        return self._optimizer()

    # -- what cannot be combined ---------------------------------------------------------
    def _check_combinable(self) -> None:
        """Raises for options that need every grad before any update, or that make
        fused_optim run torch's own step. Asked at the start of every iteration, before
        anything is written."""
        opt = self.optimizer
        for group in opt.param_groups:  # (step() would refuse them after the updates)
            opt._refuse_group_options(group)
        if getattr(opt, "max_grad_norm", None) is not None:
            raise RuntimeError(
                "fused_optim.step_in_backward cannot clip by the global grad norm "
                f"(max_grad_norm={opt.max_grad_norm}): the norm needs every grad before the "
                "first update, and step in backward updates each param as soon as its own grad "
                "is there. Set max_grad_norm=None, or remove() the handle to clip")
        reason = opt._torch_step_reason()
        if reason is not None:
            raise RuntimeError(
                f"fused_optim.step_in_backward: {reason} makes fused_optim.{type(opt).__name__} "
                "run torch.optim's own step, which updates every param at once; step in "
                "backward needs the fused kernels")
        reason = opt._whole_group_reason()
        if reason is not None:
            raise RuntimeError(
                f"fused_optim.step_in_backward: {reason}, which a bucket of the group's params "
                "cannot know during backward")

    # -- the params and their hooks ------------------------------------------------------
    def _track_params(self) -> None:
        """Hooks every param that requires grad and has none yet, and maps each param to its
        group's index. Run at install and at every step(): param groups added since, and
        params that require grad since, join at the next iteration."""
        groups = self.optimizer.param_groups
        layout = tuple(len(g["params"]) for g in groups)
        if layout != self._layout:  # at install, or a group was added
            self._shared = _shared_storage(list({p: None for g in groups for p in g["params"]}))
            self._layout = layout
            self._group_of = {p: i for i, g in enumerate(groups) for p in g["params"]}
            candidates = list(self._group_of)
        else:
            candidates = self._no_grad_params
        self._no_grad_params = []
        for p in candidates:
            if p in self._hooks:
                continue
            if p.requires_grad:
                self._hooks[p] = p.register_post_accumulate_grad_hook(self._hook)
            else:  # a frozen param (torch cannot hook it): looked at again at each step()
                self._no_grad_params.append(p)

    def _on_grad(self, p: Tensor) -> None:
        """The post-accumulate-grad hook: p's grad of this backward is complete."""
        # A backward while step() runs (in a step hook) is refused, whichever thread runs
        # the hook: the step's own (the lock is reentrant) or another, as CUDA's autograd
        # runs a CUDA param's hook on its device thread, which would wait for the lock while
        # step()'s thread waits in backward() for it (a review found that hang, 2026-12-06).
        if not self._lock.acquire(blocking=False):
            if self._stepping:
                self._refuse_backward_in_step()
            self._lock.acquire()
        try:
            self._on_grad_locked(p)
        finally:
            self._lock.release()

    def _refuse_backward_in_step(self) -> None:
        raise RuntimeError(
            "fused_optim.step_in_backward: a backward ran inside optimizer.step() (in a step "
            "hook): its grads would reach params whose update already ran in this "
            "iteration's backward. Run that backward before optimizer.step(), or remove() "
            "the handle")

    def _on_grad_locked(self, p: Tensor) -> None:
        if not self._active or self.optimizer is None:
            return
        if self._stepping:
            self._refuse_backward_in_step()
        if not self._counts:  # the first grad of an iteration
            self._check_combinable()
        grad = p.grad
        if grad is None:
            return
        if grad.is_sparse:
            raise RuntimeError(
                "fused_optim.step_in_backward does not support sparse grads (a param of "
                f"shape {tuple(p.shape)} has one): remove() the handle for this model")
        n = self._counts.get(p, 0) + 1
        if n > self._accumulation_steps:
            if self._accumulation_steps == 1:
                raise RuntimeError(
                    "fused_optim.step_in_backward: a second backward reached a param before "
                    "optimizer.step() ended the iteration, but a param is updated with the "
                    "grad of one backward, during it. Call optimizer.step() after each "
                    "backward, or pass accumulation_steps=N to accumulate the grads of N "
                    "backwards (the update then runs during the N-th). (Reentrant "
                    "activation checkpointing, use_reentrant=True, also runs a second "
                    "backward, inside the first: use use_reentrant=False. After a "
                    "backward that raised part way, optimizer.zero_grad() starts the next "
                    "iteration.)")
            raise RuntimeError(
                f"fused_optim.step_in_backward: backward number {n} reached a param since "
                f"the last optimizer.step(), with accumulation_steps="
                f"{self._accumulation_steps}: its update runs during backward number "
                f"{self._accumulation_steps}. Call optimizer.step() after every "
                f"{self._accumulation_steps} backwards")
        self._counts[p] = n
        if n < self._accumulation_steps:
            return
        self._pending.append(p)
        self._pending_bytes += grad.numel() * grad.element_size()
        if self._pending_bytes >= self._cap_bytes or (
                p in self._shared and self._all_done(self._shared[p])):
            self._flush(in_backward=True)

    def _all_done(self, params: Tuple[Tensor, ...]) -> bool:
        """Whether each of `params` has all its grads of this iteration."""
        return all(self._counts.get(q, 0) >= self._accumulation_steps for q in params)

    def _flush(self, in_backward: bool = False) -> None:
        """Updates the pending params, as FusedOptimizer.step updates a group (the fast path,
        else the general one), and frees their grads.

        Note [params sharing memory in step in backward]
        Params that are views of one tensor (one flat buffer) share its autograd version
        counter: an update of one during backward bumps it, and autograd then refuses what
        it saved of the others for the rest of the backward ("modified by an inplace
        operation"). So during backward such a param waits, pending, until every param of
        its storage has its grad (their nodes have run); then they are updated together, or
        at step() if one gets no grad. Params whose `.data` are slices of one buffer have a
        counter each and could go at once; they wait too (the storage says which params
        may share a counter, not whether they do), which only holds their grads longer."""
        params, self._pending, self._pending_bytes = self._pending, [], 0
        if in_backward and self._shared:
            waiting = [p for p in params if p in self._shared
                       and not self._all_done(self._shared[p])]
            if waiting:
                self._pending = waiting
                self._pending_bytes = sum(p.grad.numel() * p.grad.element_size()
                                          for p in waiting)
                wait = set(waiting)
                params = [p for p in params if p not in wait]
                if not params:
                    return
        opt = self.optimizer
        groups = opt.param_groups
        if self._hyper is None:
            self._hyper = [_hyper_parameters(g) for g in groups]
        by_group: Dict[int, List[Tensor]] = {}
        for p in params:
            by_group.setdefault(self._group_of[p], []).append(p)
        fast = opt._fast_path and not torch.compiler.is_compiling()
        with torch.no_grad():
            for index, group_params in by_group.items():
                group = groups[index]
                keys = opt._step_keys(group)
                args = _ops.schema_args(opt._op, opt._step_kwargs(group), None, None)
                if fast and _C._step(opt._op, [group_params], opt.state, [keys], [args]):
                    continue
                reason = opt._torch_grads_reason()
                if reason is not None:
                    raise RuntimeError(
                        f"fused_optim.step_in_backward: these grads ({reason}) make fused_optim "
                        "run torch.optim's own step, which step in backward cannot do")
                opt._update_placing_state(group, group_params,
                                          [p.grad for p in group_params], keys, args)
                bump_versions(group_params)  # Note [version counters]
        for p in params:
            p.grad = None

    # -- step() --------------------------------------------------------------------------
    def _install_step(self) -> None:
        opt = self.optimizer
        # The step to run at the end of an iteration: the instance's (an LR scheduler's
        # wrapper that records the call) or the class's (torch's hooks around ours). Held
        # unbound, as the handle and the optimizer are held weakly (Note [what step in
        # backward holds]).
        self._previous_attr = _unbind(opt.__dict__.get("step", _MISSING), opt)
        previous_step = _unbind(opt.step, opt)
        optimizer_ref = self._optimizer
        handle_ref = weakref.ref(self)

        def step(opt_self, closure=None):
            previous = _rebind(previous_step, optimizer_ref())
            handle = handle_ref()
            if handle is None or not handle._active:
                return previous() if closure is None else previous(closure)
            return handle._end_iteration(previous, closure)

        step.__doc__ = type(opt).step.__doc__
        if hasattr(previous_step, "_wrapped_by_lr_sched"):
            # A scheduler already wraps the step we call: schedulers made later must not
            # warn that step() was replaced after them.
            step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
        # A bound method, as LRScheduler's wrapper expects of optimizer.step (it calls
        # __func__ on the optimizer it holds); bound to a weak proxy of the optimizer, which
        # it does not use (a method bound to the optimizer, kept by the optimizer, would be
        # a cycle).
        self._step = types.MethodType(step, weakref.proxy(opt))
        opt.step = self._step
        self._previous_zero_grad_attr = _unbind(opt.__dict__.get("zero_grad", _MISSING), opt)
        previous_zero_grad = _unbind(opt.zero_grad, opt)

        def zero_grad(opt_self, set_to_none: bool = True) -> None:
            previous = _rebind(previous_zero_grad, optimizer_ref())
            handle = handle_ref()
            if handle is None or not handle._active:
                return previous(set_to_none)
            return handle._zero_grad(previous, set_to_none)

        zero_grad.__doc__ = type(opt).zero_grad.__doc__
        self._zero_grad_method = types.MethodType(zero_grad, weakref.proxy(opt))
        opt.zero_grad = self._zero_grad_method

    def _end_iteration(self, previous_step, closure):
        opt = self.optimizer
        with self._lock:
            refusal = self._refusal(closure)
            if refusal is not None:
                # A refused step() ends the iteration (its pending params keep their grads,
                # not updated), so that the next one starts clean; a GradScaler's scale and
                # inf flag go, as its step() removes them once ours returns.
                self._reset_iteration()
                for attr in ("grad_scale", "found_inf"):
                    opt.__dict__.pop(attr, None)
                raise RuntimeError(refusal)
            # The pending params are the only ones with grads among those updated in backward.
            self._stepping = True
            try:
                with self._hyper_parameters_of_the_iteration():
                    out = previous_step()
            except BaseException:
                # (the iteration ends with the error, as with a refused step(): the next
                # backward starts a new one)
                self._reset_iteration()
                raise
            finally:
                self._stepping = False
            for p in self._counts:
                p.grad = None
            self._reset_iteration()
            if self._active:  # (a step hook may have called remove())
                self._track_params()
        return out

    def _refusal(self, closure) -> Optional[str]:
        """Why step() cannot end this iteration, or None."""
        opt = self.optimizer
        if closure is not None:
            return ("fused_optim.step_in_backward: optimizer.step(closure) is not supported: the "
                    "closure's backward would update the params itself. Call the closure (or "
                    "loss.backward()) first, then optimizer.step()")
        if getattr(opt, "grad_scale", None) is not None \
                or getattr(opt, "found_inf", None) is not None:
            return ("fused_optim.step_in_backward cannot be combined with a GradScaler: the "
                    "updates during backward ran on scaled grads, before the scaler could unscale "
                    "them or skip a step with inf/NaN grads (this iteration's updates already "
                    "happened). Remove the GradScaler (bfloat16 autocast needs none) or remove() "
                    "the handle")
        if getattr(opt, "max_grad_norm", None) is not None:
            return ("fused_optim.step_in_backward cannot clip by the global grad norm "
                    f"(max_grad_norm={opt.max_grad_norm}, set since this iteration began: its "
                    "updates in backward ran unclipped). Set max_grad_norm=None, or remove() "
                    "the handle to clip")
        return None

    def _reset_iteration(self) -> None:
        """Forgets the iteration's backwards: the next grad starts a new one."""
        self._counts.clear()
        self._pending, self._pending_bytes = [], 0
        self._hyper = None

    @contextlib.contextmanager
    def _hyper_parameters_of_the_iteration(self):
        """Note [hyper-parameters in step in backward]
        A loop may set hyper-parameters between backward() and step() (`g["lr"] = f(it)`),
        which backward-then-step applies to the whole iteration. Step in backward updated
        most params during backward, with the values then: so step() updates the pending
        ones with those values too (each group's changed entries put back for the call, the
        new ones restored after it), the change takes effect from the next iteration, and a
        warning says so. Every param of the iteration is updated with the same values."""
        old = self._hyper
        groups = self.optimizer.param_groups
        changed = []
        for index, (group, before) in enumerate(zip(groups, old or ())):
            keys = [k for k, v in before.items() if not _same_value(group.get(k, _MISSING), v)]
            if keys:
                changed.append((index, {k: group.get(k, _MISSING) for k in keys}))
        if changed:
            warn(
                "fused_optim.step_in_backward: " + ", ".join(
                    f"param_groups[{i}]['{k}']" for i, now in changed for k in now)
                + " changed between backward() and step(). Step in backward updated most "
                "params during backward, with the values then: the rest are updated with them "
                "too, and the new values take effect from the next iteration. Change "
                "hyper-parameters before backward() (or after step()) to apply them to an "
                "iteration")
            for index, now in changed:
                groups[index].update({k: old[index][k] for k in now})
        try:
            yield
        finally:
            for index, now in changed:
                for k, v in now.items():
                    if v is _MISSING:
                        groups[index].pop(k, None)
                    else:
                        groups[index][k] = v

    def _zero_grad(self, previous_zero_grad, set_to_none: bool) -> None:
        """zero_grad() ends the iteration too: after a backward that raised part way (some
        params updated, others pending), the next backward starts a new iteration."""
        with self._lock:
            self._reset_iteration()
        previous_zero_grad(set_to_none)

    # -- the handle ----------------------------------------------------------------------
    def remove(self) -> None:
        """Takes the hooks off and restores the optimizer's step(). Params still pending keep
        their grads, so a following step() updates them as usual."""
        with self._lock:
            if not self._active:
                return
            self._active = False
            _remove_hooks(self._hooks)
            opt = self.optimizer
            if opt is not None:
                # (else a scheduler made after us wraps our step, which now passes calls
                # through)
                _restore(opt, "step", self._step, self._previous_attr)
                _restore(opt, "zero_grad", self._zero_grad_method, self._previous_zero_grad_attr)
                if getattr(opt, "_fused_step_in_backward", None) is self:
                    del opt._fused_step_in_backward
            # (the wrappers refer to the handle and to the optimizer's methods: dropped, so
            # that the optimizer is freed when its last reference goes, not at the next
            # collection; a scheduler that wrapped ours keeps it working, as pass-through)
            self._step = self._zero_grad_method = None
            self._previous_attr = self._previous_zero_grad_attr = None
            self._pending, self._counts, self._group_of, self._no_grad_params = [], {}, {}, []

    def __enter__(self) -> "StepInBackward":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
