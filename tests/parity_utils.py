"""Shared machinery of the parity tests: option tables, the test model, trajectories.

A "model" is a list of params covering every layout and size the kernels must handle,
split into two param groups, one param left without a grad. The same model is built for
fused_optim and for the reference from the same seed, so every element can be compared.
"""
import contextlib
import itertools

import numpy as np
import pytest
import torch

import fused_optim
from fused_optim._loader import built_with_cuda

ALGOS = {
    "SGD": (torch.optim.SGD, fused_optim.SGD),
    "Adam": (torch.optim.Adam, fused_optim.Adam),
    "AdamW": (torch.optim.AdamW, fused_optim.AdamW),
    "RMSprop": (torch.optim.RMSprop, fused_optim.RMSprop),
    "Adagrad": (torch.optim.Adagrad, fused_optim.Adagrad),
    "Adamax": (torch.optim.Adamax, fused_optim.Adamax),
    "Adadelta": (torch.optim.Adadelta, fused_optim.Adadelta),
    "NAdam": (torch.optim.NAdam, fused_optim.NAdam),
    "RAdam": (torch.optim.RAdam, fused_optim.RAdam),
    "Rprop": (torch.optim.Rprop, fused_optim.Rprop),
    "ASGD": (torch.optim.ASGD, fused_optim.ASGD),
}

# The CUDA tests run where there is a GPU and a build with the CUDA kernels, and are
# skipped (and reported as skipped) elsewhere.
needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and built_with_cuda()),
    reason="needs an NVIDIA GPU and fused_optim built with its CUDA kernels (FUSED_OPTIM_CUDA=1)",
)

TENSOR_LR = "tensor"  # marker in the option tables: lr given as a 0-dim tensor

# torch.optim.Muon is new in torch 2.9 (fused_optim.Muon is there where torch's is): on the
# oldest supported torch (2.8) its cases are skipped, with this reason.
needs_muon = pytest.mark.skipif(not hasattr(torch.optim, "Muon"),
                                reason=f"torch {torch.__version__} has no torch.optim.Muon (2.9+)")


def algos(*names):
    """`names` for a parametrization, Muon's case marked needs_muon."""
    return [pytest.param(n, marks=needs_muon) if n == "Muon" else n for n in names]


def _combos(**axes):
    keys = list(axes)
    for values in itertools.product(*axes.values()):
        yield dict(zip(keys, values))


def _valid_sgd(o):
    return not o["nesterov"] or (o["momentum"] > 0 and o["dampening"] == 0)


# Every combination of every option. lr is a float or a 0-dim tensor.
OPTIONS = {
    "SGD": [
        o
        for o in _combos(
            lr=[0.1, TENSOR_LR],
            momentum=[0.0, 0.9],
            dampening=[0.0, 0.3],
            nesterov=[False, True],
            weight_decay=[0.0, 0.1],
            maximize=[False, True],
        )
        if _valid_sgd(o)
    ],
    "Adam": list(
        _combos(
            lr=[0.01, TENSOR_LR],
            betas=[(0.9, 0.999), (0.3, 0.5)],
            weight_decay=[0.0, 0.1],
            amsgrad=[False, True],
            maximize=[False, True],
            decoupled_weight_decay=[False, True],
        )
    ),
    "AdamW": list(
        _combos(
            lr=[0.01, TENSOR_LR],
            weight_decay=[0.0, 0.01],
            amsgrad=[False, True],
            maximize=[False, True],
        )
    ),
    "RMSprop": list(
        _combos(
            lr=[0.01, TENSOR_LR],
            alpha=[0.99, 0.5],
            weight_decay=[0.0, 0.1],
            momentum=[0.0, 0.9],
            centered=[False, True],
            maximize=[False, True],
        )
    ),
    "Adagrad": list(
        _combos(
            lr=[0.01, TENSOR_LR],
            lr_decay=[0.0, 0.05],
            weight_decay=[0.0, 0.1],
            initial_accumulator_value=[0.0, 0.5],
            maximize=[False, True],
        )
    ),
    # (betas[0] = 0.3 takes lerp's weight >= 0.5 branch.)
    "Adamax": list(
        _combos(
            lr=[0.01, TENSOR_LR],
            betas=[(0.9, 0.999), (0.3, 0.5)],
            weight_decay=[0.0, 0.1],
            maximize=[False, True],
        )
    ),
    "Adadelta": list(
        _combos(
            lr=[1.0, TENSOR_LR],
            rho=[0.9, 0.5],
            weight_decay=[0.0, 0.1],
            maximize=[False, True],
        )
    ),
    "NAdam": list(
        _combos(
            lr=[0.01, TENSOR_LR],
            weight_decay=[0.0, 0.1],
            decoupled_weight_decay=[False, True],
            momentum_decay=[4e-3, 0.1],
            maximize=[False, True],
        )
    ),
    # With the default betas, steps 1-5 take the unrectified update and 6-10 the rectified
    # one (tests/test_parity.py checks it).
    "RAdam": list(
        _combos(
            lr=[0.01, TENSOR_LR],
            weight_decay=[0.0, 0.1],
            decoupled_weight_decay=[False, True],
            maximize=[False, True],
        )
    ),
    # (Rprop has no weight decay. lr is the initial step size, a state value: 2**-7 (also as
    # a tensor: materialize) is exact in bfloat16 and float16, as run_rounded_reference needs.
    # The second step_sizes clamp within 10 steps at both ends.)
    "Rprop": list(
        _combos(
            lr=[2**-7, TENSOR_LR],
            etas=[(0.5, 1.2), (0.3, 1.5)],
            step_sizes=[(1e-6, 50), (5e-3, 0.02)],
            maximize=[False, True],
        )
    ),
    # (t0 = 3: the averaging starts at step 4. Not alpha = 0.5: with a Tensor lr, torch's
    # `** 0.5` is its sqrt, an ulp off the IEEE one at times; AsgdCoeffs::next_eta.)
    "ASGD": list(
        _combos(
            lr=[0.01, TENSOR_LR],
            lambd=[1e-4, 0.1],
            alpha=[0.75, 0.6],
            t0=[3.0, 1e6],
            weight_decay=[0.0, 0.1],
            maximize=[False, True],
        )
    ),
}

# The per-param 0-dim state entries besides the elementwise ones: torch keeps them in
# float32 (float64 under a float64 default dtype) whatever the param's dtype.
SCALAR_STATES = ("step", "mu_product", "eta", "mu")


def option_id(o):
    return ",".join(f"{k}={v}" for k, v in o.items())


def materialize(options, group_index=0):
    """Options for a param group: the tensor-lr marker becomes a fresh 0-dim tensor."""
    o = dict(options)
    scale = 1.0 if group_index == 0 else 0.5  # the second group runs at another lr
    if o.get("lr") == TENSOR_LR:
        # SGD runs at 0.1; Rprop's lr (its initial step size) is exact in 16 bits
        base = 0.1 if "nesterov" in o else 2**-7 if "etas" in o else 0.01
        o["lr"] = torch.tensor(base * scale)
    elif "lr" in o:
        o["lr"] = o["lr"] * scale
    return o


# Sizes below, at and just above the vector widths (8 floats, 4 doubles), the 16-bit
# conversion block (256) and a size that spans many vectors plus a tail.
SIZES = [1, 3, 4, 5, 7, 8, 9, 15, 16, 17, 255, 256, 257, 2**16 + 3]


def layouts(dtype, device="cpu"):
    """name -> (param factory, grad layout). The factory makes a leaf with that layout
    from a generator (values drawn on the CPU, then moved to `device` before any view is
    taken, so the layout is the same on every device); grad layout "same" means the
    param's strides, "contiguous" differs from the param's on purpose."""

    def randn(g, *shape, dt=dtype):
        return torch.randn(shape, generator=g, dtype=dt).to(device)

    ls = {}
    for n in SIZES:
        ls[f"vec{n}"] = (lambda g, n=n: randn(g, n), "same")
    ls["matrix"] = (lambda g: randn(g, 33, 65), "same")
    ls["transposed"] = (lambda g: randn(g, 65, 33).t(), "same")
    ls["transposed_grad_contiguous"] = (lambda g: randn(g, 65, 33).t(), "contiguous")
    ls["channels_last"] = (
        lambda g: randn(g, 2, 6, 5, 7).to(memory_format=torch.channels_last), "same")
    ls["channels_last_grad_contiguous"] = (
        lambda g: randn(g, 2, 6, 5, 7).to(memory_format=torch.channels_last), "contiguous")
    # A strided view (not dense): torch's own fused=True gets this one wrong.
    ls["sliced_view"] = (lambda g: randn(g, 20, 30)[:, 1::2], "contiguous")
    ls["sliced_view_grad_strided"] = (lambda g: randn(g, 20, 30)[:, 1::2], "transposed")
    # A view one element into its storage: not 16-byte aligned (the CUDA kernels' scalar
    # loop), same-stride grad.
    ls["offset_view"] = (lambda g: randn(g, 1 + 2**16 + 5)[1:], "same")
    ls["zero_dim"] = (lambda g: randn(g), "same")
    ls["zero_size"] = (lambda g: randn(g, 0, 3), "same")
    if dtype in (torch.float32, torch.float64):
        cdtype = torch.complex64 if dtype == torch.float32 else torch.complex128
        ls["complex"] = (lambda g: randn(g, 37, dt=cdtype), "same")
    ls["no_grad"] = (lambda g: randn(g, 10), None)
    return ls


def fused_safe_layouts(dtype):
    """Layouts torch's fused=True handles correctly: dense params with same-stride grads."""
    return [k for k, (_, gl) in layouts(dtype).items() if gl in ("same", None)]


def make_model(dtype, seed=0, names=None, ref_dtype=None, device="cpu"):
    """Params (leaf tensors) for every layout, in `ref_dtype` if given (values come
    from `dtype`, so an fp64 reference starts from the same bf16 values), on `device`."""
    g = torch.Generator().manual_seed(seed)
    params = {}
    for name, (factory, _) in layouts(dtype, device).items():
        p = factory(g)
        if names is not None and name not in names:
            continue
        if ref_dtype is not None and ref_dtype != dtype:
            p = p.to(ref_dtype) if not p.is_complex() else p.to(torch.complex128)
        params[name] = p.detach().requires_grad_()
    return params


def set_grads(params, dtype, step):
    """Fresh non-zero random grads for every param (except "no_grad"), in each param's
    grad layout. Values depend only on (layout, step) and are rounded to `dtype`, so a
    higher-precision reference run sees exactly the same grads."""
    for i, (name, (_, grad_layout)) in enumerate(layouts(dtype).items()):
        p = params.get(name)
        if p is None or grad_layout is None:
            continue
        g = torch.Generator().manual_seed(1000 * step + i)
        shape = tuple(p.shape) + ((2,) if p.is_complex() else ())
        values = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        if p.is_complex():
            values = torch.view_as_complex(values.to(torch.view_as_real(p.detach()).dtype))
        values = values.to(p.dtype)
        if grad_layout == "same":
            grad = torch.empty_like(p, memory_format=torch.preserve_format)
        elif grad_layout == "contiguous":
            grad = torch.empty(p.shape, dtype=p.dtype, device=p.device)
        else:  # "transposed": strides other than the param's and than contiguous
            grad = torch.empty(tuple(reversed(p.shape)), dtype=p.dtype, device=p.device).t()
        grad.copy_(values)
        p.grad = grad


def build_optimizer(cls, params, options, **extra):
    names = list(params)
    half = len(names) // 2
    groups = [
        {"params": [params[n] for n in names[:half]], **materialize(options, 0)},
        {"params": [params[n] for n in names[half:]], **materialize(options, 1)},
    ]
    return cls(groups, **extra)


def run(cls, options, dtype, steps=10, names=None, ref_dtype=None, device="cpu", **extra):
    params = make_model(dtype, names=names, ref_dtype=ref_dtype, device=device)
    opt = build_optimizer(cls, params, options, **extra)
    for step in range(steps):
        set_grads(params, dtype, step)
        opt.step()
    return params, opt


def run_rounded_reference(torch_cls, options, dtype, steps=10, names=None):
    """What our 16-bit kernels claim to compute, built from torch's for-loop: each step
    runs torch.optim's for-loop in float32 on float32 copies of the params and state, then
    rounds params and state to `dtype`. Returns (params, state) in `dtype`."""
    low = make_model(dtype, names=names)
    work = {n: p.detach().float().requires_grad_() for n, p in low.items()}
    opt = build_optimizer(torch_cls, work, options, foreach=False)
    for step in range(steps):
        set_grads(low, dtype, step)
        for n, p in work.items():
            p.grad = None if low[n].grad is None else low[n].grad.float()
        opt.step()
        with torch.no_grad():
            for n, p in work.items():
                low[n].copy_(p)
                p.copy_(low[n])  # the float copy continues from the rounded value
            for s in opt.state.values():
                for k, v in s.items():
                    if k not in SCALAR_STATES:
                        v.copy_(v.to(dtype))
    state = {}
    for n, p in work.items():
        state[n] = {k: (v if k in SCALAR_STATES else v.to(dtype)) for k, v in opt.state.get(p, {}).items()}
    return low, state


def state_of(opt, params):
    """name -> {state key: tensor} for every param."""
    return {name: dict(opt.state.get(p, {})) for name, p in params.items()}


@contextlib.contextmanager
def correctly_rounded_sqrt():
    """torch's CPU Tensor.sqrt (MKL VML on x86) is not correctly rounded: on the machines
    we measured, about 15% of float32 and 1.4% of float64 results are 1 ulp off the IEEE
    square root. fused_optim (like torch's own fused kernels) uses the IEEE sqrt. Inside
    this context torch.optim's for-loop uses a correctly rounded sqrt too, which makes it
    a bit-exact reference for our kernels."""
    original = torch.Tensor.sqrt

    def sqrt(self):
        if self.dtype in (torch.float32, torch.float64) and not self.requires_grad:
            return torch.from_numpy(np.asarray(np.sqrt(self.detach().numpy())))
        return original(self)

    def sqrt_(self):  # RMSprop (centered) takes the in-place one
        if self.dtype in (torch.float32, torch.float64) and not self.requires_grad:
            return self.copy_(sqrt(self))
        return original_(self)

    original_ = torch.Tensor.sqrt_
    torch.Tensor.sqrt, torch.Tensor.sqrt_ = sqrt, sqrt_
    try:
        yield
    finally:
        torch.Tensor.sqrt, torch.Tensor.sqrt_ = original, original_


def assert_same_trajectory(ours, ref, *, exact, msg="", **tol):
    """Compares every param and every state tensor, elementwise."""
    (p_ours, o_ours), (p_ref, o_ref) = ours, ref
    s_ours, s_ref = state_of(o_ours, p_ours), state_of(o_ref, p_ref)
    for name in p_ref:
        a, b = p_ours[name].detach(), p_ref[name].detach().to(p_ours[name].dtype)
        check(a, b, exact, f"{msg} param {name}", **tol)
        assert s_ours[name].keys() == s_ref[name].keys(), f"{msg} state keys of {name}"
        for key, ref_value in s_ref[name].items():
            value = s_ours[name][key]
            assert value.dtype == ref_value.dtype, f"{msg} dtype of state {name}.{key}"
            assert value.shape == ref_value.shape, f"{msg} shape of state {name}.{key}"
            check(value, ref_value, exact, f"{msg} state {name}.{key}", **tol)


def check(a, b, exact, what, **tol):
    if exact:
        same = torch.equal(a, b) or (a.numel() == 0 and b.numel() == 0)
        if not same:
            diff = (a.double() - b.double()).abs().max().item() if a.is_floating_point() else "?"
            raise AssertionError(f"{what}: not bitwise equal (max abs diff {diff})")
    else:
        torch.testing.assert_close(a, b, msg=lambda m: f"{what}: {m}", **tol)
