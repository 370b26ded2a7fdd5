"""What surrounds torch.optim keeps working: every LR scheduler, swa_utils, state_dict hooks
and torch.compile drive fused_optim exactly as they drive torch.optim.

Comparisons are bitwise: the reference is torch.optim's for-loop with a correctly rounded
sqrt (the one difference between it and our kernels, see parity_utils.correctly_rounded_sqrt).
"""
import warnings

import pytest
import torch
from torch.optim import lr_scheduler as S
from torch.optim import swa_utils

import fused_optim
from parity_utils import correctly_rounded_sqrt

ALGOS = {
    "SGD": (torch.optim.SGD, fused_optim.SGD, dict(lr=0.1, momentum=0.9)),
    "Adam": (torch.optim.Adam, fused_optim.Adam, dict(lr=0.01)),
    "AdamW": (torch.optim.AdamW, fused_optim.AdamW, dict(lr=0.01)),
    "RMSprop": (torch.optim.RMSprop, fused_optim.RMSprop, dict(lr=0.01, momentum=0.9)),
    "Adagrad": (torch.optim.Adagrad, fused_optim.Adagrad, dict(lr=0.05, lr_decay=0.01)),
    "Adamax": (torch.optim.Adamax, fused_optim.Adamax, dict(lr=0.01)),
    "Adadelta": (torch.optim.Adadelta, fused_optim.Adadelta, dict(lr=0.5)),
    "NAdam": (torch.optim.NAdam, fused_optim.NAdam, dict(lr=0.01)),
    "RAdam": (torch.optim.RAdam, fused_optim.RAdam, dict(lr=0.01)),
    "Rprop": (torch.optim.Rprop, fused_optim.Rprop, dict(lr=0.01)),
    "ASGD": (torch.optim.ASGD, fused_optim.ASGD, dict(lr=0.01, t0=3.0)),
}
# The algorithms whose momentum (or betas[0]) CyclicLR and OneCycleLR can cycle.
CYCLES_MOMENTUM = ("SGD", "Adam", "AdamW", "RMSprop", "Adamax", "NAdam", "RAdam")


def model_fn(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3))


def loss_at(model, step):
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(16, 5, generator=g), torch.randn(16, 3, generator=g)
    return torch.nn.functional.mse_loss(model(x), y)


# name -> scheduler factory(opt, algo)
SCHEDULERS = {
    "LambdaLR": lambda o, a: S.LambdaLR(o, lambda e: 0.9 ** e),
    "MultiplicativeLR": lambda o, a: S.MultiplicativeLR(o, lambda e: 0.95),
    "StepLR": lambda o, a: S.StepLR(o, step_size=3, gamma=0.5),
    "MultiStepLR": lambda o, a: S.MultiStepLR(o, milestones=[2, 5, 8], gamma=0.3),
    "ConstantLR": lambda o, a: S.ConstantLR(o, factor=0.5, total_iters=4),
    "LinearLR": lambda o, a: S.LinearLR(o, start_factor=0.2, total_iters=6),
    "ExponentialLR": lambda o, a: S.ExponentialLR(o, gamma=0.8),
    "PolynomialLR": lambda o, a: S.PolynomialLR(o, total_iters=8, power=2.0),
    "CosineAnnealingLR": lambda o, a: S.CosineAnnealingLR(o, T_max=5),
    "CosineAnnealingWarmRestarts": lambda o, a: S.CosineAnnealingWarmRestarts(o, T_0=3, T_mult=2),
    # momentum cycling: SGD's and RMSprop's momentum, beta1 of Adam, Adamax, NAdam, RAdam
    "CyclicLR": lambda o, a: S.CyclicLR(o, base_lr=0.001, max_lr=0.05, step_size_up=3,
                                        cycle_momentum=a in CYCLES_MOMENTUM, base_momentum=0.8,
                                        max_momentum=0.95),
    "OneCycleLR": lambda o, a: S.OneCycleLR(o, max_lr=0.05, total_steps=12,
                                            cycle_momentum=a in CYCLES_MOMENTUM),
    "SequentialLR": lambda o, a: S.SequentialLR(
        o, [S.LinearLR(o, start_factor=0.1, total_iters=3), S.ExponentialLR(o, gamma=0.9)], milestones=[3]),
    "ChainedScheduler": lambda o, a: S.ChainedScheduler(
        [S.ConstantLR(o, factor=0.5, total_iters=4), S.ExponentialLR(o, gamma=0.9)]),
    "ReduceLROnPlateau": lambda o, a: S.ReduceLROnPlateau(o, factor=0.5, patience=1),
}


def run_with_scheduler(opt_cls, kwargs, sched_name, algo, steps=12):
    model = model_fn()
    opt = opt_cls(model.parameters(), **kwargs)
    sched = SCHEDULERS[sched_name](opt, algo)
    history = []
    for step in range(steps):
        opt.zero_grad()
        loss = loss_at(model, step)
        loss.backward()
        opt.step()
        # ReduceLROnPlateau watches a metric: a plateau from step 4 on
        sched.step(1.0 if step >= 4 else 1.0 - step) if sched_name == "ReduceLROnPlateau" else sched.step()
        history.append([(g["lr"], g.get("momentum"), g.get("betas")) for g in opt.param_groups])
    return model, opt, history


@pytest.mark.parametrize("sched_name", SCHEDULERS)
@pytest.mark.parametrize("algo", ALGOS)
def test_lr_schedulers_drive_fused_optim_as_torch_optim(algo, sched_name):
    torch_cls, ours_cls, kwargs = ALGOS[algo]
    with correctly_rounded_sqrt():
        ref_model, ref_opt, ref_hist = run_with_scheduler(
            torch_cls, dict(kwargs, foreach=False), sched_name, algo)
        model, opt, hist = run_with_scheduler(ours_cls, kwargs, sched_name, algo)
    assert hist == ref_hist  # the same lr (and momentum/betas) at every step
    assert len({h[0][0] for h in hist}) > 1, "the scheduler should change the lr"
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        for key, value in ref_opt.state[q].items():
            assert torch.equal(opt.state[p][key], value), key


@pytest.mark.parametrize("algo", ALGOS)
def test_swa_utils(algo):
    torch_cls, ours_cls, kwargs = ALGOS[algo]

    def run(cls, extra):
        model = model_fn()
        swa_model = swa_utils.AveragedModel(model)
        opt = cls(model.parameters(), **kwargs, **extra)
        swa_sched = swa_utils.SWALR(opt, swa_lr=0.005, anneal_epochs=3)
        lrs = []
        for step in range(10):
            opt.zero_grad()
            loss_at(model, step).backward()
            opt.step()
            if step >= 4:
                swa_model.update_parameters(model)
                swa_sched.step()
            lrs.append(opt.param_groups[0]["lr"])
        return swa_model, lrs

    with correctly_rounded_sqrt():
        ref, ref_lrs = run(torch_cls, dict(foreach=False))
        ours, lrs = run(ours_cls, {})
    assert lrs == ref_lrs
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(ours.n_averaged, ref.n_averaged)


@pytest.mark.parametrize("algo", ALGOS)
def test_state_dict_hooks(algo):
    torch_cls, ours_cls, kwargs = ALGOS[algo]

    def run(cls, extra):
        model = model_fn()
        opt = cls(model.parameters(), **kwargs, **extra)
        calls = []
        opt.register_state_dict_pre_hook(lambda o: calls.append("sd_pre"))
        opt.register_state_dict_post_hook(lambda o, sd: dict(sd, extra_key=1))
        opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load_pre"))
        opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
        loss_at(model, 0).backward()
        opt.step()
        sd = opt.state_dict()
        assert sd["extra_key"] == 1
        sd.pop("extra_key")
        opt.load_state_dict(sd)
        return calls

    assert run(ours_cls, {}) == run(torch_cls, dict(foreach=False)) == ["sd_pre", "load_pre", "load_post"]


# -- torch.compile ------------------------------------------------------------------------
def _graph_breaks(fn, *args):
    import torch._dynamo

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(*args)
    return explanation.graph_break_count, [str(r.reason) for r in explanation.break_reasons]


@pytest.mark.parametrize("algo", ["SGD", "AdamW", "RMSprop", "Adagrad"])
def test_compiled_training_step_has_no_graph_break_from_fused_optim(algo):
    torch_cls, ours_cls, kwargs = ALGOS[algo]

    def make(cls, extra):
        model = model_fn()
        opt = cls(model.parameters(), **kwargs, **extra)

        def train_step(step):
            opt.zero_grad()
            loss = loss_at(model, step)
            loss.backward()
            opt.step()
            return loss

        return model, opt, train_step

    # Graph breaks of the whole step with fused_optim, against the same step with torch.optim:
    # fused_optim adds none (the backward call is what dynamo breaks on, for both).
    _, _, ours_step = make(ours_cls, {})
    _, _, ref_step = make(torch_cls, dict(foreach=False))
    ours_breaks, ours_reasons = _graph_breaks(ours_step, 0)
    ref_breaks, _ = _graph_breaks(ref_step, 0)
    assert ours_breaks <= ref_breaks, ours_reasons
    assert not any("fused_optim" in r for r in ours_reasons), ours_reasons

    # compiled (inductor) and eager training give the same params
    torch._dynamo.reset()
    eager_model, _, eager_step = make(ours_cls, {})
    compiled_model, _, compiled_step = make(ours_cls, {})
    compiled_step = torch.compile(compiled_step)
    for step in range(4):
        eager_step(step)
        compiled_step(step)
    for p, q in zip(compiled_model.parameters(), eager_model.parameters()):
        # forward/backward code generated by inductor may round differently from eager
        # (fused, reordered float32 reductions); the optimizer's own update is the same op.
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("dynamic", [None, True])
def test_compiled_sparse_adam_step_does_not_recompile_every_step(dynamic):
    """Dynamo cannot trace sparse grads; torch's SparseAdam step falls back to eager. Ours
    traced its group loop and guarded on each param's Python-int step, so that a compiled
    step made a new graph at every step until Dynamo's recompile limit (8) and its warning
    (found by a differential fuzz, 2026-12-08). Now the loop is not traced: after the
    first steps no step compiles anything, and the values are torch's eager SparseAdam's,
    bit for bit, over 10 steps of sparse grads that name different rows."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    out, graphs = [], []
    for cls, compiled in ((torch.optim.SparseAdam, False), (fused_optim.SparseAdam, True)):
        torch._dynamo.reset()
        counters.clear()
        g = torch.Generator().manual_seed(0)
        p = torch.randn(6, 4, generator=g, requires_grad=True)
        opt = cls([p], lr=0.01)
        step = torch.compile(opt.step, dynamic=dynamic) if compiled else opt.step
        per_step = []
        for i in range(10):
            nnz = 1 + i % 5
            p.grad = torch.sparse_coo_tensor(torch.randint(0, 6, (1, nnz), generator=g),
                                             torch.randn(nnz, 4, generator=g), p.shape)
            before = counters["stats"].get("unique_graphs", 0)
            step()
            per_step.append(counters["stats"].get("unique_graphs", 0) - before)
        out.append((p.detach().clone(), opt.state[p]["exp_avg"].clone(),
                    opt.state[p]["exp_avg_sq"].clone(), opt.state[p]["step"]))
        graphs = per_step
    assert sum(graphs[3:]) == 0, graphs  # (the old code: a graph at each of steps 1-8)
    for a, b in zip(out[0], out[1]):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))


@pytest.mark.parametrize("algo", ["SGD", "Adam", "RMSprop", "Adagrad", "Rprop"])
def test_compiled_step_with_tensor_lr_scheduler_does_not_recompile(algo):
    """torch's recipe for compiled optimizers with a scheduler: a tensor lr, and the step and
    the scheduler in one compiled function. The lr changing every step must not recompile.
    (Rprop's step sizes, made from the lr at the first step, broke the compiled frame for
    good: every later step ran eagerly; found by a review, 2026-12-05.)"""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    torch_cls, ours_cls, kwargs = ALGOS[algo]

    def run(cls, compiled, extra=None):
        torch._dynamo.reset()
        counters.clear()
        model = model_fn()
        # a fresh tensor lr each run: the scheduler updates it in place
        opt = cls(model.parameters(), **dict(kwargs, lr=torch.tensor(kwargs["lr"])), **(extra or {}))
        sched = S.ExponentialLR(opt, gamma=0.9)
        counter = CompileCounterWithBackend("inductor")

        def step():
            opt.step()
            sched.step()

        step_fn = torch.compile(step, backend=counter) if compiled else step
        lrs = []
        for i in range(6):
            opt.zero_grad()
            loss_at(model, i).backward()
            step_fn()
            lrs.append(opt.param_groups[0]["lr"].item())
        breaks = sum(counters["graph_break"].values())
        return model, opt, counter.frame_count, breaks, lrs

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the kernel runs: no fallback warning
        warnings.filterwarnings("ignore", message=".*(jit|Profiler).*")
        compiled_model, compiled_opt, frames, breaks, lrs = run(ours_cls, True)
    eager_model, eager_opt, _, _, eager_lrs = run(ours_cls, False)
    _, _, ref_frames, ref_breaks, _ = run(torch_cls, True, dict(foreach=False))
    assert lrs == eager_lrs and len(set(lrs)) == 6
    # Compiled once, plus at most once more after the first step created the state; no
    # more graph breaks than torch.optim's own compiled step.
    assert frames <= max(2, ref_frames), frames
    assert breaks <= ref_breaks, (breaks, ref_breaks)
    # The compiled step calls the same kernel with the same inputs: bitwise the same.
    for p, q in zip(compiled_model.parameters(), eager_model.parameters()):
        assert torch.equal(p, q)
        for key, value in eager_opt.state[q].items():
            assert torch.equal(compiled_opt.state[p][key], value), key


def _compiled_runs_of_the_op(make_opt, steps=4, dtype=torch.float32, n=5000):
    """Steps of make_opt([p]) compiled from the first (the state made inside the compiled
    region), and the number of those whose optimizer op ran inside a compiled graph; the
    params after them."""
    import torch._dynamo
    from torch._inductor.compile_fx import compile_fx

    torch._dynamo.reset()
    ran = [0]

    def backend(gm, example_inputs):
        has_op = any(node.op == "call_function" and "fused_optim" in str(node.target)
                     for node in gm.graph.nodes)
        compiled = compile_fx(gm, example_inputs)

        def run(*args):
            if has_op:
                ran[0] += 1
            return compiled(*args)

        return run

    p = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=dtype).requires_grad_()
    opt = make_opt([p])
    step = torch.compile(opt.step, backend=backend)
    for i in range(steps):
        p.grad = torch.randn(n, generator=torch.Generator().manual_seed(i + 1), dtype=dtype)
        step()
    return ran[0], p.detach().clone(), opt


@pytest.mark.parametrize("case", ["Rprop, tensor lr", "Adam, state_dtype=torch.uint8"])
def test_a_compiled_step_that_makes_the_state_stays_compiled(case):
    """Making the state inside the first compiled step broke the frame for good (a masked
    assignment in the 8-bit quantization, a fill from Rprop's tensor lr): every later step
    ran eagerly, silently (found by a review, 2026-12-05). Now every step runs the op inside
    a compiled graph, with eager's bits."""
    make = {"Rprop, tensor lr": lambda ps: fused_optim.Rprop(ps, lr=torch.tensor(0.01)),
            "Adam, state_dtype=torch.uint8":
                lambda ps: fused_optim.Adam(ps, lr=0.01, state_dtype=torch.uint8)}[case]
    ran, compiled, _ = _compiled_runs_of_the_op(make)
    assert ran == 4
    p = torch.randn(5000, generator=torch.Generator().manual_seed(0)).requires_grad_()
    opt = make([p])
    for i in range(4):
        p.grad = torch.randn(5000, generator=torch.Generator().manual_seed(i + 1))
        opt.step()
    assert torch.equal(compiled, p.detach())


def test_tensor_betas_under_capture_scalar_outputs_run_torchs_step():
    """With torch._dynamo.config.capture_scalar_outputs = True, a traced .item() of a
    Tensor beta is a symbolic float, which the op's float argument refused (an error where
    torch's compiled step works; found by a review, 2026-12-05). That step runs torch's own
    implementation, with the one-time warning: the same values as torch's compiled step."""
    import torch._dynamo

    out = []
    for cls in (torch.optim.Adam, fused_optim.Adam):
        torch._dynamo.reset()
        p = torch.nn.Parameter(torch.ones(10))
        opt = cls([p], lr=0.01, betas=(torch.tensor(0.9), torch.tensor(0.999)))
        with torch._dynamo.config.patch(capture_scalar_outputs=True), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            step = torch.compile(opt.step)
            for i in range(3):
                p.grad = torch.randn(10, generator=torch.Generator().manual_seed(i))
                step()
        out.append(p.detach().clone())
    torch.testing.assert_close(out[1], out[0], rtol=0, atol=0)


@pytest.mark.parametrize("algo", ["SGD", "Adam", "Rprop"])
def test_complex_params_under_torch_compile_run_torchs_compiled_step(algo):
    """Inductor fails on the op's in-place update of complex tensors ("auto_functionalized_v2
    was not removed": an error where torch's compiled step works; found by a review,
    2026-12-05). A compiled step of complex params runs torch's own, with the one-time
    warning: torch's compiled step's values, bit for bit."""
    import torch._dynamo

    torch_cls, ours_cls, kwargs = ALGOS[algo]
    # (the warning is once per process: whatever an earlier test gave)
    fused_optim.optimizer.FusedOptimizer._warned.discard((algo, "complex params under torch.compile"))
    out = []
    for cls in (torch_cls, ours_cls):
        torch._dynamo.reset()
        p = torch.randn(4, 3, dtype=torch.complex64, generator=torch.Generator().manual_seed(0),
                        requires_grad=True)
        opt = cls([p], **kwargs)
        step = torch.compile(opt.step)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for i in range(3):
                p.grad = torch.randn(4, 3, dtype=torch.complex64,
                                     generator=torch.Generator().manual_seed(i + 1))
                step()
        out.append(p.detach().clone())
    assert any("complex params under torch.compile" in str(w.message) for w in caught)
    assert torch.equal(out[0], out[1])


@pytest.mark.parametrize("algo", ["SGD", "Adam"])
def test_a_numpy_lr_under_torch_compile_runs_torchs_compiled_step(algo):
    """A LambdaLR whose lambda returns np.cos(...) makes the lr a NumPy float64, which
    Dynamo traces as an array: the op's float argument refused its FakeTensor, an error
    where torch's compiled step works (found by a review, 2026-12-07). Such a compiled step
    runs torch's own, with the one-time warning: torch's compiled step's values, bit for
    bit, the lr changing every step."""
    np = pytest.importorskip("numpy")
    import torch._dynamo

    torch_cls, ours_cls, kwargs = ALGOS[algo]
    fused_optim.optimizer.FusedOptimizer._warned.discard(
        (algo, "lr given as a NumPy scalar under torch.compile"))
    out = []
    for cls in (torch_cls, ours_cls):
        torch._dynamo.reset()
        g = torch.Generator().manual_seed(0)
        p = torch.randn(4, 3, generator=g, requires_grad=True)
        opt = cls([p], **kwargs)
        step = torch.compile(opt.step)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for i in range(3):
                opt.param_groups[0]["lr"] = np.float64(0.01 * np.cos(i / 10))
                p.grad = torch.randn(4, 3, generator=g)
                step()
        out.append(p.detach().clone())
    assert any("lr given as a NumPy scalar under torch.compile" in str(w.message)
               for w in caught)
    assert torch.equal(out[0], out[1])
