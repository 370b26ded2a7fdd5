"""The eager fast path (Note [fast path] in fused_optim/optimizer.py, Note [direct calls]
in csrc/direct_call.h): which groups it takes, which it declines, and that it computes
exactly what the dispatcher path computes."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fused_optim
from fused_optim import _C, _ops
from parity_utils import ALGOS, algos, needs_cuda

KWARGS = {
    "SGD": dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1),
    "Adam": dict(lr=0.01, amsgrad=True, weight_decay=0.1),
    "AdamW": dict(lr=0.01, maximize=True),
    "RMSprop": dict(lr=0.01, momentum=0.5, centered=True, weight_decay=0.1),
    "Adagrad": dict(lr=0.1, lr_decay=0.01, weight_decay=0.1),
    "Adamax": dict(lr=0.01, weight_decay=0.1, maximize=True),
    "Adadelta": dict(lr=0.5, rho=0.8, weight_decay=0.1),
    "NAdam": dict(lr=0.01, weight_decay=0.1, momentum_decay=0.1),
    "RAdam": dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
    "Rprop": dict(lr=0.01, etas=(0.4, 1.3), maximize=True),
    "ASGD": dict(lr=0.01, lambd=0.1, t0=2.0, weight_decay=0.1),
}


def make_params(seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7,), (33, 5), (0,), (16,), (3, 4, 5), (1,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype).to(device))
              for s in shapes]
    # a view
    params.append(torch.randn(6, 4, generator=g, dtype=dtype).to(device).t().requires_grad_())
    return params


def set_grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for i, p in enumerate(params):
        # One param without a grad: it is left out, as torch.optim leaves it.
        p.grad = None if i == 3 else torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device)


def fast_step(opt, group, grad_scale=None, found_inf=None):
    with torch.no_grad():
        return _C._step(opt._op, [group["params"]], opt.state, [opt._state_keys(group)],
                        [_ops.schema_args(opt._op, opt._kernel_args(group), grad_scale,
                                          found_inf)])


@pytest.mark.parametrize("algo", list(ALGOS))
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_fast_path_is_bitwise_the_dispatcher_path(device, algo, monkeypatch):
    """The fast path takes a group on one device (CPU, or one GPU: its CUDA kernel) and
    computes exactly what the dispatcher path computes."""
    check_fast_path_is_bitwise_the_dispatcher_path(device, algo, monkeypatch)


def check_fast_path_is_bitwise_the_dispatcher_path(device, algo, monkeypatch):
    fused_cls = ALGOS[algo][1]
    fast_params, slow_params = make_params(device=device), make_params(device=device)
    fast = fused_cls(fast_params, **KWARGS[algo])
    slow = fused_cls(slow_params, **KWARGS[algo])
    real_step = _C._step
    for step in range(4):
        set_grads(fast_params, step)
        set_grads(slow_params, step)
        taken = []

        def spy(*args):
            taken.append(real_step(*args))
            return taken[-1]

        monkeypatch.setattr(fused_optim.optimizer._C, "_step", spy)
        fast.step()
        monkeypatch.setattr(fused_optim.optimizer._C, "_step", lambda *args: False)
        slow.step()
        # The first step creates the state on the general path (except Adagrad's, made at
        # construction); every later step is one call of the fast path, for all groups.
        if step > 0 or algo == "Adagrad":
            assert taken == [True]
        else:
            assert taken[0] is False
    for p, q in zip(fast_params, slow_params):
        assert torch.equal(p, q)  # bitwise: one kernel, the same arguments
        for key, value in fast.state[p].items():
            assert torch.equal(value, slow.state[q][key]), key


@needs_cuda
@pytest.mark.parametrize("algo", list(ALGOS))
def test_fast_path_declines_cuda_groups_it_cannot_take(algo):
    """A CUDA group with grad_scale / found_inf on the GPU (a kernel may read them on the
    host, and the fast path holds the GIL), and a group with params on two devices (the
    general path makes one call per device), go through the op."""
    fused_cls = ALGOS[algo][1]
    params = make_params(device="cuda")
    opt = fused_cls(params, **KWARGS[algo])
    set_grads(params, 0)
    opt.step()  # creates the state
    group = opt.param_groups[0]
    assert fast_step(opt, group)
    assert not fast_step(opt, group, torch.ones((), device="cuda"), torch.zeros((), device="cuda"))
    mixed = [torch.randn(4, requires_grad=True), torch.randn(4, device="cuda", requires_grad=True)]
    opt = fused_cls(mixed, **KWARGS[algo])
    set_grads(mixed, 0)
    opt.step()
    assert not fast_step(opt, opt.param_groups[0])


def test_fast_path_declines_what_it_does_not_handle():
    params = make_params()
    set_grads(params, 0)
    opt = fused_optim.Adam(params, lr=0.01)
    group = opt.param_groups[0]
    assert not fast_step(opt, group)  # no state yet: the general path creates it
    opt.step()
    set_grads(params, 1)
    assert fast_step(opt, group)

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func)
            return func(*args, **(kwargs or {}))

    # An active dispatch mode must see the op: the step goes through the dispatcher.
    with Recorder() as mode:
        assert not fast_step(opt, group)
        opt.step()
    assert torch.ops.fused_optim.adam_.default in mode.ops

    # A state entry that is not a tensor: declined, and the general path raises torch's
    # KeyError for a missing one.
    saved = opt.state[params[0]].pop("exp_avg")
    assert not fast_step(opt, group)
    with pytest.raises(KeyError, match="exp_avg"):
        opt.step()
    opt.state[params[0]]["exp_avg"] = saved

    # A tensor subclass param takes the general path, and is updated the same way.
    class Sub(torch.Tensor):
        pass

    sub = torch.randn(5).as_subclass(Sub).requires_grad_()
    plain = sub.detach().clone().as_subclass(torch.Tensor).requires_grad_()
    opt_sub, opt_plain = fused_optim.Adam([sub], lr=0.1), fused_optim.Adam([plain], lr=0.1)
    for seed in range(3):
        sub.grad = torch.randn(5, generator=torch.Generator().manual_seed(seed))
        plain.grad = sub.grad.clone()
        opt_sub.step()
        opt_plain.step()
    assert not fast_step(opt_sub, opt_sub.param_groups[0])
    assert torch.equal(sub.as_subclass(torch.Tensor), plain)


def test_fast_path_raises_the_kernels_errors_with_nothing_changed():
    params = make_params()
    set_grads(params, 0)
    opt = fused_optim.Adam(params, lr=0.01)
    opt.step()
    before = [p.detach().clone() for p in params]
    steps = [opt.state[p]["step"].clone() for p in params if p.grad is not None]
    opt.state[params[4]]["exp_avg_sq"] = torch.zeros(3)  # a wrong shape
    with pytest.raises(RuntimeError, match=r"exp_avg_sqs\[3\] has shape \[3\] but its param has shape \[3, 4, 5\]"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(torch.equal(opt.state[p]["step"], s)
               for p, s in zip([p for p in params if p.grad is not None], steps))


def test_fast_path_is_seen_by_the_profiler():
    params = make_params()
    set_grads(params, 0)
    opt = fused_optim.SGD(params, lr=0.1, momentum=0.9)
    opt.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        assert fast_step(opt, opt.param_groups[0])
    assert any(e.name == "fused_optim::sgd_" for e in prof.events())


class Sub(torch.Tensor):
    pass


def test_a_group_the_fast_path_declines_does_not_hold_back_the_others(monkeypatch):
    def model():
        plain = make_params(seed=1)
        sub = torch.randn(9, generator=torch.Generator().manual_seed(2)).as_subclass(Sub)
        return plain, [sub.requires_grad_()]

    (fast_plain, fast_sub), (slow_plain, slow_sub) = model(), model()
    fast = fused_optim.AdamW([{"params": fast_plain}, {"params": fast_sub, "lr": 0.1}], lr=0.01)
    slow = fused_optim.AdamW([{"params": slow_plain}, {"params": slow_sub, "lr": 0.1}], lr=0.01)
    real_step = _C._step
    for step in range(3):
        for params in (fast_plain + fast_sub, slow_plain + slow_sub):
            set_grads(params, step)
        calls = []

        def spy(op, groups, *rest):
            calls.append((len(groups), real_step(op, groups, *rest)))
            return calls[-1][1]

        monkeypatch.setattr(fused_optim.optimizer._C, "_step", spy)
        fast.step()
        monkeypatch.setattr(fused_optim.optimizer._C, "_step", lambda *args: False)
        slow.step()
        if step > 0:
            # All groups at once: declined (the subclass); then group by group: the plain
            # group takes the fast path, the subclass group the general path.
            assert calls == [(2, False), (1, True), (1, False)]
    for p, q in zip(fast_plain + fast_sub, slow_plain + slow_sub):
        assert torch.equal(p.as_subclass(torch.Tensor), q.as_subclass(torch.Tensor))
        for key, value in fast.state[p].items():
            assert torch.equal(value, slow.state[q][key]), key


def test_sparse_grads_found_after_the_fast_path_declines():
    # SGD's sparse grads run torch's for-loop for the whole step, as before the fast path:
    # the fast path declines a sparse grad and then the grads are looked at.
    emb = torch.nn.Embedding(10, 3, sparse=True)
    ref = torch.nn.Embedding(10, 3, sparse=True)
    ref.load_state_dict(emb.state_dict())
    dense = torch.nn.Parameter(torch.randn(4))
    ref_dense = torch.nn.Parameter(dense.detach().clone())
    opt = fused_optim.SGD([{"params": [dense]}, {"params": emb.parameters()}], lr=0.1)
    ref_opt = torch.optim.SGD([{"params": [ref_dense]}, {"params": ref.parameters()}], lr=0.1)
    idx = torch.tensor([1, 3, 3])
    for _ in range(3):
        for e, d, o in ((emb, dense, opt), (ref, ref_dense, ref_opt)):
            o.zero_grad()
            (e(idx).sum() + (d * d).sum()).backward()
        opt.step()  # our kernels refuse sparse grads: it completes only through torch's
        ref_opt.step()
    # Both ran torch's for-loop: bitwise equal.
    assert torch.equal(emb.weight, ref.weight)
    assert torch.equal(dense, ref_dense)


def test_an_argument_of_another_kind_is_declined_before_any_update():
    # A 0-dim tensor where the schema has a float (torch.optim accepts one for eps): the
    # fast path leaves it to the op call, having updated no group.
    params = make_params()
    set_grads(params, 0)
    opt = fused_optim.Adam([{"params": params[:3]}, {"params": params[3:], "eps": 1e-8}], lr=0.01)
    opt.step()
    before = [p.detach().clone() for p in params]
    groups = opt.param_groups
    args = [_ops.schema_args("adam_", opt._kernel_args(g), None, None) for g in groups]
    eps = _ops._ARG_NAMES["adam_"].index("eps")
    args[1] = args[1][:eps] + (torch.tensor(1e-8),) + args[1][eps + 1:]
    with torch.no_grad():
        taken = _C._step("adam_", [g["params"] for g in groups], opt.state,
                         [opt._state_keys(g) for g in groups], args)
    assert taken is False
    assert all(torch.equal(p, b) for p, b in zip(params, before))


@pytest.mark.parametrize("algo", list(ALGOS))
def test_fast_path_finds_state_by_the_real_hash(algo, monkeypatch):
    """Note [state lookups by id]: the fast path looks a param's state up with the hash
    Tensor.__hash__ would return (id(self)) without calling it, but only after checking
    that it does return that. With another __hash__ the state dict is keyed by other
    hashes, and the fast path must still find every param's state (a missed lookup would
    decline the group) and compute what the dispatcher path computes."""
    monkeypatch.setattr(torch.Tensor, "__hash__", lambda self: id(self) ^ 0x5A5A5)
    check_fast_path_is_bitwise_the_dispatcher_path("cpu", algo, monkeypatch)


@pytest.fixture
def two_threads():
    """At least two threads: the parallel passes over tensors' metadata (the plan's checks,
    increment_steps, the gather) run only then, from kParallelChecks (1,024) tensors."""
    old = torch.get_num_threads()
    torch.set_num_threads(max(2, old))
    yield
    torch.set_num_threads(old)


def test_copy_on_write_tensors_are_updated_as_torch_updates_them(two_threads):
    """Params, grads, states and steps whose storage is copy-on-write (a lazy clone shares
    it) are copied when first written, as torch's in-place ops copy them: the step equals
    torch's for-loop bit for bit, and the tensors they shared storage with keep their
    values. 1,500 params at 2 threads: more than the plan's and increment_steps' parallel
    passes start at (kParallelChecks, 1,024), where a copy-on-write tensor is left for a
    serial pass."""
    from parity_utils import correctly_rounded_sqrt

    g = torch.Generator().manual_seed(0)
    n = 1500
    ours = [torch.randn(5 + i % 7, generator=g).requires_grad_() for i in range(n)]
    ref = [p.detach().clone().requires_grad_() for p in ours]
    kwargs = dict(lr=0.01, weight_decay=0.1, amsgrad=True)
    opt = fused_optim.Adam(ours, **kwargs)
    ref_opt = torch.optim.Adam(ref, foreach=False, **kwargs)

    def set_grads(step):
        g = torch.Generator().manual_seed(100 + step)
        for p, q in zip(ours, ref):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()

    set_grads(0)
    with correctly_rounded_sqrt():
        opt.step()
        ref_opt.step()
    # Of every five params: the first's step, the second's exp_avg, the third itself and the
    # fourth's grad copy-on-write; `originals` are the other halves of those lazy clones,
    # which must keep their values. Param 5 takes a lazy clone of param 0's step: two steps
    # that share one copy-on-write buffer, each counted once.
    originals = []
    for i, p in enumerate(ours):
        if i % 5 == 0:
            originals.append(torch._lazy_clone(opt.state[p]["step"]))
        elif i % 5 == 1:
            originals.append(torch._lazy_clone(opt.state[p]["exp_avg"]))
        elif i % 5 == 2:
            originals.append(torch._lazy_clone(p.detach()))
    opt.state[ours[5]]["step"] = torch._lazy_clone(opt.state[ours[0]]["step"])
    for step in range(1, 4):
        set_grads(step)
        if step == 1:
            for i, p in enumerate(ours):
                if i % 5 == 3:
                    originals.append(p.grad)
                    p.grad = torch._lazy_clone(p.grad)
            before = [t.clone() for t in originals]
        with correctly_rounded_sqrt():
            opt.step()
            ref_opt.step()
    for i, (p, q) in enumerate(zip(ours, ref)):
        assert torch.equal(p, q), f"param {i}"
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], ref_opt.state[q][key]), f"{key} of param {i}"
    for i, (t, b) in enumerate(zip(originals, before)):
        assert torch.equal(t, b), f"a tensor that shared storage with a state or param changed ({i})"


def test_a_step_whose_storage_was_freed_raises_before_any_step_is_counted(two_threads):
    """A step whose storage was freed (resize_(0)) gets torch's own error from the kernel,
    before any step is counted or param written (increment_steps finds every step's value
    before it writes one): over the parallel threshold too."""
    params = [torch.randn(3, requires_grad=True) for _ in range(1500)]
    for p in params:
        p.grad = torch.randn(3)
    opt = fused_optim.Adam(params, lr=0.1)
    opt.step()
    before = [p.detach().clone() for p in params]
    steps = [opt.state[p]["step"] for p in params]
    steps[1200].untyped_storage().resize_(0)
    with pytest.raises(RuntimeError, match="data is not allocated"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(float(s) == 1.0 for i, s in enumerate(steps) if i != 1200)


@pytest.mark.skipif(not hasattr(torch.Tensor, "grad_dtype"), reason="torch < 2.9: no grad_dtype")
def test_a_grad_of_another_dtype_in_a_big_group_runs_torchs_step(two_threads):
    """The fast path's check of each grad (plain, its param's dtype) runs on torch's
    threads for a big group: a grad of another dtype late in 1,500 params still sends the
    group to torch's step (with the one-time warning), which gives torch's result."""
    import warnings

    results = []
    for cls, kw in ((torch.optim.SGD, dict(foreach=False)), (fused_optim.SGD, {})):
        g = torch.Generator().manual_seed(0)
        params = [torch.randn(4, generator=g, dtype=torch.float64).requires_grad_()
                  for _ in range(1500)]
        for p in params:
            p.grad = torch.randn(4, generator=g, dtype=torch.float64)
        params[1400].grad_dtype = None
        params[1400].grad = torch.ones(4, dtype=torch.float32)
        opt = cls(params, lr=0.1, momentum=0.9, **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                opt.step()
                opt.step()
                results.append([p.detach().clone() for p in params])
            except RuntimeError as e:
                results.append(str(e))
    if isinstance(results[0], str):
        assert results[0] == results[1]
    else:
        assert all(torch.equal(a, b) for a, b in zip(*results))


# -- tensors a user put in the state by hand (found by a review, 2026-12-06) ----------------
_STATE_KEY = {"SGD": "momentum_buffer", "Adam": "exp_avg", "Adagrad": "sum"}


def _stepped_twice_setup(name, n=5):
    g = torch.Generator().manual_seed(0)
    ps = [torch.randn(4, 3, generator=g).requires_grad_(), torch.randn(n, generator=g).requires_grad_()]
    kw = dict(momentum=0.9) if name == "SGD" else {}
    opt = getattr(fused_optim, name)(ps, lr=0.1, **kw)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)
    return ps, opt


def _snapshot(ps, opt):
    return [p.detach().clone() for p in ps] + [
        v.clone() for p in ps for v in opt.state[p].values() if isinstance(v, torch.Tensor)
        and v.device.type != "meta" and v.untyped_storage().nbytes() >= v.numel() * v.element_size()]


def _assert_unchanged(before, ps, opt):
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(ps, opt))), "changed"


@pytest.mark.parametrize("name", ["SGD", "Adam", "Adagrad"])
@pytest.mark.parametrize("what", ["state", "grad under a GradScaler"])
def test_an_expanded_written_tensor_is_refused_before_anything_changes(name, what):
    """An expanded state (or an expanded grad that a GradScaler step unscales in place) went
    through a layout temporary, whose write-back raised torch's overlap error after both
    params and their steps were updated: a retry updated them twice. Now the same error,
    before anything changes."""
    ps, opt = _stepped_twice_setup(name)
    if what == "state":
        s = opt.state[ps[1]][_STATE_KEY[name]]
        opt.state[ps[1]][_STATE_KEY[name]] = s[:1].expand(5)
    else:
        ps[1].grad = ps[1].grad[:1].expand(5)
        opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.tensor(0.0)
    before = _snapshot(ps, opt)
    with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
        opt.step()
    _assert_unchanged(before, ps, opt)


@pytest.mark.parametrize("name", ["SGD", "Adam", "Adagrad"])
@pytest.mark.parametrize("key", ["moment", "step"])
def test_a_state_on_the_meta_device_is_refused(name, key):
    """A state replaced by a meta tensor sent the call to the op's Meta kernel (its fake
    kernel), which computes nothing: the step did nothing, silently. torch's for-loop raises
    a device error; ours a clear one, before anything changes."""
    if name == "SGD" and key == "step":
        pytest.skip("SGD keeps no step")
    ps, opt = _stepped_twice_setup(name)
    k = _STATE_KEY[name] if key == "moment" else "step"
    opt.state[ps[1]][k] = opt.state[ps[1]][k].to("meta")
    before = _snapshot(ps, opt)
    with pytest.raises(RuntimeError, match=r"\[1\] is on meta but a param is on cpu"):
        opt.step()
    _assert_unchanged(before, ps, opt)
    # (a direct call whose first param is on meta and the second not: refused too)
    m, c = torch.zeros(3, device="meta"), torch.ones(3)
    with pytest.raises(RuntimeError, match=r"params\[0\] is on meta but a param is on cpu"):
        torch.ops.fused_optim.sgd_([m, c], [m.clone(), c.clone()], [], 0.1, 0.0, 0.0, 0.0,
                                   False, False, True)
    assert torch.equal(c, torch.ones(3))


@pytest.mark.parametrize("name", ["SGD", "Adam", "Adagrad"])
@pytest.mark.parametrize("what", ["param", "grad", "state", "state shrunk"])
def test_a_tensor_whose_storage_no_longer_holds_it_is_a_clear_error(name, what):
    """A storage resized by hand (FSDP frees params with untyped_storage().resize_(0)): the
    loops read and wrote past the allocation, a crash or a corrupted heap (torch's for-loop
    crashes too). Now a clear error, before anything changes."""
    ps, opt = _stepped_twice_setup(name, n=64)
    t = {"param": ps[1], "grad": ps[1].grad}.get(what, opt.state[ps[1]][_STATE_KEY[name]])
    before = _snapshot(ps[:1], opt)  # (the first param: updated first; the other's memory is gone)
    t.untyped_storage().resize_(8 if what == "state shrunk" else 0)
    with pytest.raises(RuntimeError, match=r"\[1\] reaches 256 bytes into its storage, which "
                                           rf"holds {8 if what == 'state shrunk' else 0} "):
        opt.step()
    _assert_unchanged(before, ps[:1], opt)
    if name != "SGD":
        assert float(opt.state[ps[1]]["step"]) == 1  # (not counted)


@pytest.mark.parametrize("name", ["SGD", "Adagrad"])
def test_a_state_shared_by_two_params_steps_as_the_for_loop_at_two_threads(name):
    """Two params given one state tensor by hand: torch's for-loop updates it twice, param
    after param. Split across threads, our two updates raced on it (results differed from
    run to run); a call whose state entries share memory now runs on one thread, in list
    order (Note [aliased params] in csrc/plan.cpp), bitwise the for-loop."""
    from parity_utils import correctly_rounded_sqrt
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        results = []
        for cls in (getattr(torch.optim, name), getattr(fused_optim, name)):
            g = torch.Generator().manual_seed(0)
            ps = [torch.randn(2**17, generator=g).requires_grad_() for _ in range(2)]
            kw = dict(momentum=0.9) if name == "SGD" else {}
            opt = cls(ps, lr=0.1, **kw, **({"foreach": False} if cls.__module__.startswith("torch") else {}))
            for step in range(3):
                for p in ps:
                    p.grad = torch.randn(p.shape, generator=g)
                with correctly_rounded_sqrt():
                    opt.step()
                if step == 0:  # from the second step on, one state for both
                    opt.state[ps[1]][_STATE_KEY[name]] = opt.state[ps[0]][_STATE_KEY[name]]
            results.append([p.detach().clone() for p in ps] + [opt.state[ps[0]][_STATE_KEY[name]].clone()])
        for a, b in zip(*results):
            assert torch.equal(a, b)
    finally:
        torch.set_num_threads(threads)


_STRUCTURED_KEY = {"Adafactor": "row_var", "Muon": "momentum_buffer", "SparseAdam": "exp_avg"}


@pytest.mark.parametrize("name", algos("Adafactor", "Muon", "SparseAdam"))
@pytest.mark.parametrize("what", ["expanded state", "freed param", "freed state", "freed grad"])
def test_the_structured_optimizers_refuse_such_tensors_before_anything_changes(name, what):
    """Adafactor's, Muon's and SparseAdam's own plans, checked as the elementwise plan is
    (above): a freed or shrunk storage crashed them (SIGSEGV, or glibc's abort), an
    expanded state raised after the first param's update (or, SparseAdam, stepped)."""
    g = torch.Generator().manual_seed(0)
    ps = [torch.randn(8, 8, generator=g).requires_grad_() for _ in range(2)]
    opt = getattr(fused_optim, name)(ps, lr=0.1)

    def grads():
        for p in ps:
            grad = torch.randn(p.shape, generator=g)
            p.grad = grad.to_sparse() if name == "SparseAdam" else grad

    grads()
    opt.step()
    grads()
    key = _STRUCTURED_KEY[name]
    before = _snapshot(ps[:1], opt)
    if what == "expanded state":
        s = opt.state[ps[1]][key]
        opt.state[ps[1]][key] = s.reshape(-1)[:1].expand(s.shape)
        error = "more than one element of the written-to tensor"
    else:
        t = {"freed param": ps[1], "freed state": opt.state[ps[1]][key],
             "freed grad": ps[1].grad._values() if name == "SparseAdam" else ps[1].grad}[what]
        t.untyped_storage().resize_(0)
        error = r"\[1\] reaches \d+ bytes into its storage, which holds 0 "
    with pytest.raises(RuntimeError, match=error):
        opt.step()
    _assert_unchanged(before, ps[:1], opt)


@pytest.mark.parametrize("what", ["8-bit scales", "rounding state"])
def test_a_mode_tensor_whose_storage_no_longer_holds_it_is_a_clear_error(what):
    """param_aux's tensors (8-bit moments' block scales, stochastic rounding's state) are
    read and written too: a shrunk scale tensor crashed the step, a shrunk rounding state
    was read past its end."""
    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if what == "rounding state" else torch.float32
    kw = dict(stochastic_rounding=True) if what == "rounding state" else dict(state_dtype=torch.uint8)
    ps = [torch.randn(64, 64, generator=g).to(dtype).requires_grad_() for _ in range(3)]
    opt = fused_optim.Adam(ps, lr=0.1, **kw)
    for _ in range(2):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g).to(dtype)
        if opt.state:
            break
        opt.step()
    before = _snapshot(ps[:1], opt)
    key = "rounding_state" if what == "rounding state" else "exp_avg_absmax"
    opt.state[ps[2]][key].untyped_storage().resize_(4)
    with pytest.raises(RuntimeError, match=r"param_aux.*\[2\] reaches \d+ bytes into its "
                                           "storage, which holds 4 "):
        opt.step()
    _assert_unchanged(before, ps[:1], opt)


@pytest.mark.parametrize("name,key,listed", [
    ("Adam", "exp_avg_sq", "exp_avg_sqs"), ("SGD", "momentum_buffer", "momentum_buffers"),
    ("RMSprop", "square_avg", "square_avgs"), ("Adagrad", "sum", "state_sums"),
    ("Adadelta", "acc_delta", "acc_deltas"), ("Adamax", "exp_inf", "exp_infs"),
    ("NAdam", "exp_avg", "exp_avgs"), ("RAdam", "exp_avg_sq", "exp_avg_sqs"),
    ("Rprop", "step_size", "step_sizes"), ("ASGD", "ax", "axs")])
def test_the_kernels_errors_name_a_state_by_the_ops_list(name, key, listed):
    # (they said state[k][i] until 2026-12-06: two reviews found it unclear). The position
    # is among the params with a grad: param 0 has none here, so param 2 is entry 1.
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(3)]
    kw = dict(momentum=0.9) if name == "SGD" else {}
    opt = getattr(fused_optim, name)(params, lr=0.01, **kw)
    for p in params:
        p.grad = torch.randn(3)
    opt.step()
    opt.state[params[2]][key] = opt.state[params[2]][key].double()
    params[0].grad = None
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match=rf"{listed}\[1\] has dtype Double but its param has "
                                           r"dtype Float"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_a_big_step_lets_other_python_threads_run():
    """Note [the GIL during a step] (csrc/python_step.cpp): a step of big tensors runs its
    kernels without the GIL, as torch's ops do, so another Python thread runs meanwhile (a
    review found a heartbeat thread frozen for a whole step). Python's switch interval is made
    long, so that only a release of the GIL lets the other thread (a ticker) run during a
    step; what is asserted is the longest time in each step with no tick, against the step's
    own length, so neither the machine's speed nor its sleep resolution sets a count."""
    import sys
    import threading
    import time

    p = torch.zeros(1 << 24, requires_grad=True)  # (16M elements: tens of ms a step)
    p.grad = torch.ones_like(p)
    opt = fused_optim.Adam([p], lr=0.1)
    opt.step()  # (the first step makes the state, on the general path)
    ticks, stop = [], threading.Event()

    def ticker():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.0002)

    thread = threading.Thread(target=ticker)
    interval, threads = sys.getswitchinterval(), torch.get_num_threads()
    sys.setswitchinterval(1.0)
    # (one thread for the kernels, so a core is free for the ticker: with every core in the
    # step's threads, the ticker ran only when the scheduler preempted one, and a CI machine
    # counted 8 ticks in three steps with the GIL released)
    torch.set_num_threads(1)
    thread.start()
    steps = []
    try:
        time.sleep(0.01)
        for _ in range(3):
            start = time.perf_counter()
            opt.step()
            end = time.perf_counter()
            steps.append((start, end))
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)
        torch.set_num_threads(threads)
    for start, end in steps:
        times = [start] + [t for t in ticks if start < t < end] + [end]
        longest = max(b - a for a, b in zip(times, times[1:]))
        # (with the GIL held, the kernel's whole time, most of the step, has no tick: the
        # ticker runs only in the step's own Python, where torch's ops let it in for a moment;
        # with the GIL released, the gaps are the ticker's sleeps, 0.2 ms here and a few ms on
        # a coarse timer, in a step of 10 ms or more)
        assert longest < 0.5 * (end - start), (longest, end - start, len(times) - 2)
    assert float(opt.state[p]["step"]) == 4
