"""torch's own optimizer test database, run against fused_optim.

torch ships `torch.testing._internal.common_optimizers.optim_db`: for each torch.optim
class, the constructor configurations its own tests run (`optim_inputs_func`) and the bad
inputs it must reject, with the exception type and message (`optim_error_inputs_func`).
It is internal to torch and changes with each release, which is the point here: whatever
the installed torch tests its optimizers with, fused_optim is tested with too, so a torch
upgrade that adds an option or an error check fails here if we do not follow.

Each case runs torch's class and ours on the same input and compares what happened: the
same exception type and message (or the same warning), and for the configurations the
same params and state, elementwise, after a few steps.
"""
import copy
import pickle
import warnings

import pytest
import torch

import fused_optim
from parity_utils import correctly_rounded_sqrt

common_optimizers = pytest.importorskip(
    "torch.testing._internal.common_optimizers",
    reason="this torch does not ship its optimizer test database",
)
ErrorOn = common_optimizers.OptimizerErrorEnum


def _ours(info):
    cls = getattr(fused_optim, info.optim_cls.__name__, None)
    if cls is None or cls is info.optim_cls:
        return None  # not a fused_optim class (LBFGS is torch's own, re-exported)
    return cls


# Every torch.optim class in the database: fused_optim has a class of its own for each but
# LBFGS (whose cost is closure evaluations, not the update: torch's own, re-exported).
INFOS = [info for info in common_optimizers.optim_db if _ours(info) is not None]


def test_every_class_of_the_database_is_ours():
    assert INFOS
    assert [info.name for info in common_optimizers.optim_db if _ours(info) is None] == ["LBFGS"]


def _outcome(fn):
    """What fn did: ("raised", type, message) or ("returned",), and the warnings it gave
    (category and message; the order kept)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fn()
            result = ("returned",)
        except Exception as e:  # noqa: BLE001 (every exception is compared)
            result = ("raised", type(e), str(e))
    return result, [(w.category, str(w.message)) for w in caught]


def _run_error_input(cls, error_input):
    optim_input = error_input.optimizer_error_input
    params, kwargs = optim_input.params, optim_input.kwargs
    if error_input.error_on == ErrorOn.CONSTRUCTION_ERROR:
        return _outcome(lambda: cls(params, **kwargs))
    optimizer = cls(params, **kwargs)
    return _outcome(optimizer.step)


@pytest.mark.parametrize("info", INFOS, ids=lambda info: info.name)
def test_torch_error_inputs(info):
    """Every bad input of torch's database: the same exception type and message as torch's
    class (or the same warning), raised at the same point (construction or step)."""
    if info.optim_error_inputs_func is None:
        pytest.skip(f"torch's database has no error inputs for {info.name}")
    ours = _ours(info)
    # The inputs are made twice, one list for each class: a step may not leave a param of
    # one run to the other.
    for mine, theirs in zip(
        info.optim_error_inputs_func(device="cpu", dtype=torch.float32),
        info.optim_error_inputs_func(device="cpu", dtype=torch.float32),
    ):
        desc = mine.optimizer_error_input.desc
        expected, expected_warnings = _run_error_input(info.optim_cls, theirs)
        got, got_warnings = _run_error_input(ours, mine)
        assert got == expected, f"{info.name}, {desc!r}: torch {expected}, fused_optim {got}"
        if issubclass(theirs.error_type, Warning):
            wanted = [w for w in expected_warnings if issubclass(w[0], theirs.error_type)]
            assert wanted, f"{info.name}, {desc!r}: torch gave no {theirs.error_type.__name__}"
            for w in wanted:
                assert w in got_warnings, f"{info.name}, {desc!r}: torch warned {w}, fused_optim {got_warnings}"
        else:
            assert expected[0] == "raised", f"{info.name}, {desc!r}: torch raised nothing"


# Adafactor's and Muon's results differ from torch's by the order of their reductions and
# matmuls: the tolerances of their own tests (Note [Adafactor's tolerance] in
# test_adafactor.py; Note [Muon's tolerance] in test_muon.py, where a param may be off by
# 2^-4 of a step's size per step and the momentum buffer is exact). Every other class is
# bitwise torch's for-loop with an IEEE square root (tests/test_parity.py).
_ADAFACTOR_TOL = {torch.float32: dict(rtol=2**-16, atol=2**-14), torch.float64: dict(rtol=1e-12, atol=1e-13)}
_STEPS = 5


def _shapes(info):
    if info.name == "Muon":
        return [(5, 7), (7, 5), (6, 6)]  # (2-D only)
    return [(5, 7), (13,), (3, 4, 2), ()]


def _randn(shape, gen, dtype):
    if dtype.is_complex:  # (real and imaginary parts from the generator, as in float64)
        real = torch.randn((*shape, 2), generator=gen, dtype=torch.float64).to(dtype.to_real())
        return torch.view_as_complex(real)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def _grad(shape, dtype, gen, sparse):
    g = _randn(shape, gen, dtype)
    if sparse:  # SparseAdam: rows 1 and 3 of the first dim untouched, an index repeated
        keep = [i for i in range(shape[0]) if i not in (1, 3)]
        idx = torch.tensor([keep + keep[:1]])
        values = g[idx[0]] / 2
        return torch.sparse_coo_tensor(idx, values, shape)
    return g


def _trajectory(cls, kwargs, shapes, dtype, sparse, schedulers=(), steps=_STEPS):
    gen = torch.Generator().manual_seed(7)
    params = [_randn(s, gen, dtype).requires_grad_() for s in shapes]
    if kwargs.get("differentiable"):  # (torch's own tests of it step non-leaf params)
        params = [p.clone() for p in params]
    optimizer = cls(params, **copy.deepcopy(kwargs))
    schedulers = [make(optimizer) for make in schedulers]
    for step in range(steps):
        grad_gen = torch.Generator().manual_seed(100 + step)
        for p in params:
            p.grad = _grad(p.shape, dtype, grad_gen, sparse)
        optimizer.step()
        for scheduler in schedulers:
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(1.0)  # (a loss that never improves: it cuts the lr at step 11)
            else:
                scheduler.step()
    return params, optimizer


def _configs(info):
    return common_optimizers._get_optim_inputs_including_global_cliquey_kwargs(
        "cpu", None, info, skip=("fused",)
    )


@pytest.mark.parametrize(
    "info, dtype",
    [
        pytest.param(info, dtype, id=f"{info.name}-{dtype}")
        for info in INFOS
        for dtype in (torch.float64, torch.float32, torch.complex64)
        if info.supports_complex or not dtype.is_complex
    ],
)
def test_torch_configurations(info, dtype):
    """Every configuration torch's database runs its class with (foreach and differentiable
    included, each on and off), five steps on params of several shapes (complex ones where
    the database says the class supports them): every element of every param and state
    tensor as torch's for-loop leaves it."""
    ours = _ours(info)
    sparse = info.only_supports_sparse_grads
    shapes = [s for s in _shapes(info) if not sparse or len(s) >= 1]
    configs = _configs(info)
    assert configs, info.name
    for config in configs:
        assert config.params is None, config  # (the database leaves params to the test)
        # The reference is torch's for-loop; with differentiable=True fused_optim runs
        # torch's own step (its kernels compute no autograd graph), so the reference is that.
        reference_kwargs = dict(config.kwargs)
        if not config.kwargs.get("differentiable") and "foreach" in config.kwargs:
            reference_kwargs["foreach"] = False
        what = f"{info.name} {config.desc!r} {dtype}"
        with correctly_rounded_sqrt(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (fused_optim's one-time notes of torch's paths)
            ref = _trajectory(info.optim_cls, reference_kwargs, shapes, dtype, sparse)
            got = _trajectory(ours, config.kwargs, shapes, dtype, sparse)
        _assert_same(info, config, got, ref, what, _STEPS, dtype)


def _assert_same(info, config, got, ref, what, steps, dtype):
    (p_ours, o_ours), (p_ref, o_ref) = got, ref
    for i, (a, b) in enumerate(zip(p_ours, p_ref)):
            s_ours, s_ref = o_ours.state.get(a, {}), o_ref.state.get(b, {})
            pairs = [(f"param {i}", a.detach(), b.detach())]
            assert s_ours.keys() == s_ref.keys(), f"{what}: state keys of param {i}"
            pairs += [(f"param {i} {k}", s_ours[k], s_ref[k]) for k in s_ref]
            for name, x, y in pairs:
                msg = f"{what}: {name}"
                if torch.is_tensor(y):
                    assert torch.is_tensor(x) and x.dtype == y.dtype and x.shape == y.shape, msg
                if info.name == "Adafactor":
                    torch.testing.assert_close(x, y, msg=msg, **_ADAFACTOR_TOL[dtype])
                elif info.name == "Muon" and name == f"param {i}":
                    lr = float(config.kwargs.get("lr", 1e-3))
                    atol = steps * lr * max(1.0, (a.shape[0] / a.shape[1]) ** 0.5) * 2**-4
                    torch.testing.assert_close(x, y, rtol=0, atol=atol, msg=msg)
                elif torch.is_tensor(y):
                    assert torch.equal(x, y), f"{msg}: not bitwise equal, max diff {(x.double() - y.double()).abs().max()}"
                else:
                    assert x == y, msg


@pytest.mark.parametrize("info", INFOS, ids=lambda info: info.name)
def test_torch_scheduler_inputs(info):
    """The LR schedulers torch's database runs each class with, on each of its
    configurations (float32; twelve steps, so that StepLR's and ReduceLROnPlateau's cuts
    happen): every param and state element as torch's for-loop under the same schedulers.
    A Tensor lr is changed in place by the schedulers: the step must read the new value."""
    ours = _ours(info)
    sparse = info.only_supports_sparse_grads
    shapes = [s for s in _shapes(info) if not sparse or len(s) >= 1]
    steps = 12
    for schedulers in info.scheduler_inputs:
        for config in info.optim_inputs_func("cpu"):
            names = "+".join(type(make(torch.optim.SGD([torch.zeros(1)]))).__name__ for make in schedulers)
            what = f"{info.name} {config.desc!r} under {names}"
            with correctly_rounded_sqrt(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ref = _trajectory(info.optim_cls, config.kwargs, shapes, torch.float32, sparse, schedulers, steps)
                got = _trajectory(ours, config.kwargs, shapes, torch.float32, sparse, schedulers, steps)
            lrs = [(g["lr"], h["lr"]) for g, h in zip(got[1].param_groups, ref[1].param_groups)]
            assert all(float(a) == float(b) for a, b in lrs), f"{what}: lrs {lrs}"
            _assert_same(info, config, got, ref, what, steps, torch.float32)


@pytest.mark.parametrize("info", INFOS, ids=lambda info: info.name)
def test_older_and_nontensor_step_state_dicts(info):
    """As torch's own tests load them: a state_dict whose param_groups lack the flags added
    after the class's first release (`not_og_supported_flags`: foreach, maximize,
    differentiable, capturable...), and one whose `step` entries are Python numbers, load
    into fused_optim's class as into torch's, and the next steps leave every param and state
    element as torch's do from the same dict."""
    ours = _ours(info)
    sparse = info.only_supports_sparse_grads
    shapes = [s for s in _shapes(info) if not sparse or len(s) >= 1]
    for config in info.optim_inputs_func("cpu"):
        for edit in ("older flags", "nontensor step"):
            what = f"{info.name} {config.desc!r}, {edit}"
            with correctly_rounded_sqrt(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _, first = _trajectory(info.optim_cls, config.kwargs, shapes, torch.float32, sparse)
                saved = copy.deepcopy(first.state_dict())
                if edit == "older flags":
                    for group in saved["param_groups"]:
                        for flag in info.not_og_supported_flags:
                            group.pop(flag, None)
                else:
                    for state in saved["state"].values():
                        if torch.is_tensor(state.get("step")):
                            state["step"] = state["step"].item()
                runs = []
                for cls in (ours, info.optim_cls):
                    params, optimizer = _trajectory(cls, config.kwargs, shapes, torch.float32, sparse, steps=0)
                    optimizer.load_state_dict(copy.deepcopy(saved))
                    for step in range(3):
                        grad_gen = torch.Generator().manual_seed(500 + step)
                        for p in params:
                            p.grad = _grad(p.shape, torch.float32, grad_gen, sparse)
                        optimizer.step()
                    runs.append((params, optimizer))
            # (both runs' params start from the same fresh values: the dict's state is what
            # they continue from)
            _assert_same(info, config, runs[0], runs[1], what, 3, torch.float32)


@pytest.mark.parametrize("info", INFOS, ids=lambda info: info.name)
def test_printing_pickling_and_steps_without_grads(info):
    """On each configuration of torch's database, as torch's class: the printed optimizer
    (the class name aside), a pickle round trip after two steps (the same param_groups and
    state), a step where no param has a grad (nothing changes, no state made), then a step
    with zero grads (the same state keys and dtypes)."""
    ours = _ours(info)
    sparse = info.only_supports_sparse_grads
    shapes = [s for s in _shapes(info) if not sparse or len(s) >= 1]
    for config in info.optim_inputs_func("cpu"):
        seen = []
        for cls in (ours, info.optim_cls):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                params, optimizer = _trajectory(cls, config.kwargs, shapes, torch.float32, sparse, steps=2)
                copied = pickle.loads(pickle.dumps(optimizer))
                assert type(copied) is cls
                assert repr(copied.state_dict()) == repr(optimizer.state_dict())
                params, fresh = _trajectory(cls, config.kwargs, shapes, torch.float32, sparse, steps=0)
                before = [p.detach().clone() for p in params]
                fresh.step()
                unchanged = all(torch.equal(a, b) for a, b in zip(before, params)) and not fresh.state
                for p in params:
                    p.grad = torch.zeros_like(p).to_sparse() if sparse else torch.zeros_like(p)
                fresh.step()
            keys = sorted((k, v.dtype if torch.is_tensor(v) else type(v)) for s in fresh.state.values() for k, v in s.items())
            seen.append((repr(optimizer).replace(cls.__name__, "<class>", 1), unchanged, keys))
        assert seen[0] == seen[1], f"{info.name} {config.desc!r}: fused_optim {seen[0]}, torch {seen[1]}"
