"""fused_optim.Adafactor against torch.optim.Adafactor's for-loop: every option, dtype and
layout, every element of every param and state tensor; bitwise across thread counts;
checkpoints both ways; GradScaler; torch's errors.

Adafactor is not in parity_utils.ALGOS: the shared suites compare the elementwise kernels
bit for bit, with layouts (complex, zero-size params) that torch's Adafactor refuses, and
through the eager fast path, which Adafactor does not take (Note [Adafactor's state lists]
in fused_optim/adafactor.py). This file covers the same ground for it.

Note [Adafactor's tolerances]
The kernel sums in double in an order fixed by the shapes (Note [Adafactor's sums] in
csrc/cpu/adafactor.cpp); torch's norms and means add float32 params in float32, in its own
orders. So the row and column means, the param's RMS (alpha) and the update's RMS (the
clipping denominator) differ from torch's by rounding: a few ulps of the param's dtype,
which the lerps carry into row_var/col_var/variance (relative to each value) and the update
carries into the params (relative to the update, alpha * u / denom, which reaches 10 and
more where u = g / sqrt(estimate) is large: an absolute error on params near zero). Every
other op follows torch's, rounding for rounding. Measured on the cases below (10 steps):
float32 params within 5.0e-6 absolute and state within 9.4e-7 relative of torch's;
float64 within 9.1e-15 absolute and 1.3e-15 relative. The tolerances are about ten times
that: float32 rtol 2^-16 (1.5e-5), atol 2^-14 (6.1e-5); float64 rtol 1e-12, atol 1e-13. A
mistake in the math (an op order, a clamp, a sign, a coefficient in the wrong precision,
the wrong branch of rho_t or of the clipping) moves values by 1e-3 or more here.
"""
import copy
import io
import inspect
import itertools
import os
import re
import subprocess
import sys

import pytest
import torch

import fused_optim
import parity_utils as pu

TOL = {torch.float32: dict(rtol=2**-16, atol=2**-14), torch.float64: dict(rtol=1e-12, atol=1e-13)}
TENSOR_LR = pu.TENSOR_LR


def _combos(**axes):
    keys = list(axes)
    return [dict(zip(keys, v)) for v in itertools.product(*axes.values())]


# lr 0.5: rho_t = min(lr, 1/sqrt(step)) switches to 1/sqrt(step) from step 5 (both branches;
# also with the 0.5 Tensor lr, whose comparison and products are float32 tensor ops in
# torch). eps1=None: torch.finfo(dtype).eps. d=3 clips less often than d=1. Every lr,
# weight decay, maximize and eps together; beta2_decay and d alternate over those (each
# value meets every other option's values).
OPTIONS = [dict(o, beta2_decay=[-0.8, -0.5][i % 2], d=[1.0, 3.0][(i // 2) % 2])
           for i, o in enumerate(_combos(lr=[0.01, 0.5, TENSOR_LR], weight_decay=[0.0, 0.1],
                                         maximize=[False, True],
                                         eps=[(None, 1e-3), (1e-5, 0.05)]))]
IDS = [pu.option_id(o) for o in OPTIONS]


def materialize(options, group_index=0):
    o = dict(options)
    scale = 1.0 if group_index == 0 else 0.5
    o["lr"] = torch.tensor(0.5 * scale) if o["lr"] == TENSOR_LR else o["lr"] * scale
    return o


def layouts(dtype, device="cpu"):
    """name -> (factory(generator), grad layout): every layout torch's Adafactor takes (the
    views made on `device`, from the same values on every device)."""
    def randn(g, *shape):
        return torch.randn(shape, generator=g, dtype=dtype).to(device)

    ls = {}
    for n in (1, 3, 7, 8, 9, 17, 257, 2**16 + 3):  # around the 8 lanes and the 2^16 chunks
        ls[f"vec{n}"] = (lambda g, n=n: randn(g, n), "same")
    ls["zero_dim"] = (lambda g: randn(g), "same")
    ls["matrix"] = (lambda g: randn(g, 33, 65), "same")
    ls["one_row"] = (lambda g: randn(g, 1, 40), "same")
    ls["one_column"] = (lambda g: randn(g, 40, 1), "same")
    # rows of more than 2^16 elements: passes 2-3 take one row per task
    ls["wide"] = (lambda g: randn(g, 3, 2**16 + 5), "same")
    # many rows: several tasks of whole rows in passes 2-3
    ls["tall"] = (lambda g: randn(g, 3000, 37), "same")
    ls["batched"] = (lambda g: randn(g, 3, 17, 9), "same")
    ls["transposed"] = (lambda g: randn(g, 65, 33).t(), "same")
    ls["transposed_grad_contiguous"] = (lambda g: randn(g, 65, 33).t(), "contiguous")
    ls["channels_last"] = (lambda g: randn(g, 2, 6, 5, 7).to(memory_format=torch.channels_last), "same")
    ls["sliced_view"] = (lambda g: randn(g, 20, 30)[:, 1::2], "contiguous")
    ls["sliced_vec"] = (lambda g: randn(g, 40)[1::3], "same")
    ls["no_grad"] = (lambda g: randn(g, 10), None)
    return ls


def make_model(dtype, ref_dtype=None, device="cpu"):
    g = torch.Generator().manual_seed(0)
    params = {}
    for name, (factory, _) in layouts(dtype, device).items():
        p = factory(g)
        if ref_dtype is not None:
            p = p.to(ref_dtype)
        params[name] = p.detach().requires_grad_()
    return params


def set_grads(params, dtype, step):
    for i, (name, (_, grad_layout)) in enumerate(layouts(dtype).items()):
        p = params[name]
        if grad_layout is None:
            continue
        g = torch.Generator().manual_seed(1000 * step + i)
        values = torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype)
        if name == "vec9":
            values[3] = 0.0  # a zero grad: the eps1 clamps
        grad = (torch.empty_like(p, memory_format=torch.preserve_format) if grad_layout == "same"
                else torch.empty(p.shape, dtype=p.dtype, device=p.device))
        grad.copy_(values)
        p.grad = grad


def build(cls, params, options, **extra):
    names = list(params)
    half = len(names) // 2
    return cls([{"params": [params[n] for n in names[:half]], **materialize(options, 0)},
                {"params": [params[n] for n in names[half:]], **materialize(options, 1)}], **extra)


def run(cls, options, dtype, steps=10, ref_dtype=None, device="cpu", **extra):
    params = make_model(dtype, ref_dtype, device)
    opt = build(cls, params, options, **extra)
    for step in range(steps):
        set_grads(params, dtype, step)
        opt.step()
    return params, opt


def assert_close_trajectory(ours, ref, tol, msg=""):
    (p_ours, o_ours), (p_ref, o_ref) = ours, ref
    for name, p in p_ref.items():
        torch.testing.assert_close(p_ours[name].detach(), p.detach().to(p_ours[name].dtype),
                                   msg=lambda m: f"{msg} param {name}: {m}", **tol)
        s_ours, s_ref = o_ours.state.get(p_ours[name], {}), o_ref.state.get(p, {})
        assert s_ours.keys() == s_ref.keys(), f"{msg} state keys of {name}"
        for key, v in s_ref.items():
            w = s_ours[key]
            assert w.dtype == v.dtype and w.shape == v.shape and w.device == v.device, (name, key)
            if key == "step":
                assert torch.equal(w, v), f"{msg} step of {name}"
            else:
                torch.testing.assert_close(w, v, msg=lambda m: f"{msg} {name}.{key}: {m}", **tol)


def assert_bitwise(a, b, msg=""):
    (pa, oa), (pb, ob) = a, b
    for name in pa:
        assert torch.equal(pa[name], pb[name]), f"{msg} param {name}"
        sa, sb = oa.state.get(pa[name], {}), ob.state.get(pb[name], {})
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{msg} {name}.{key}"


# -- parity ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("options", OPTIONS, ids=IDS)
def test_matches_for_loop(options, dtype):
    ours = run(fused_optim.Adafactor, options, dtype)
    ref = run(torch.optim.Adafactor, options, dtype, foreach=False)
    assert_close_trajectory(ours, ref, TOL[dtype], f"{dtype}")


def test_big_slices_and_many_slices():
    """A slice of more than 2^18 elements takes several row blocks in pass 1 (their column
    sums combined after it), and a batch of many slices; 3 steps. On slices this big
    torch's float32 for-loop is itself off by up to ~1e-4 relative to the exact result
    (its float32 column sums, means and norms over thousands of elements), so float32 is
    judged against the same training in float64: ours must be at least as close to it as
    torch's float32 for-loop is, element for element in the worst case. float64 against
    torch's float64 for-loop (Note [Adafactor's tolerances])."""
    g = torch.Generator().manual_seed(0)
    shapes = [(2100, 2050), (64, 9, 7), (4100, 1100)]
    init = [torch.randn(s, generator=g) for s in shapes]  # float32 values
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(3)]
    eps = (torch.finfo(torch.float32).eps, 1e-3)

    def train(cls, dtype, **extra):
        ps = [p.to(dtype).clone().requires_grad_() for p in init]
        opt = cls(ps, lr=0.5, weight_decay=0.1, eps=eps, **extra)
        for step in range(3):
            for p, gr in zip(ps, grads[step]):
                p.grad = gr.to(dtype)  # the same float32 values everywhere
            opt.step()
        return ps, opt

    ours32, torch32 = train(fused_optim.Adafactor, torch.float32), train(torch.optim.Adafactor, torch.float32, foreach=False)
    ours64, exact = train(fused_optim.Adafactor, torch.float64), train(torch.optim.Adafactor, torch.float64, foreach=False)
    for k in range(len(shapes)):
        pairs = [(ours32[0][k], torch32[0][k], exact[0][k])]
        pairs += [(ours32[1].state[ours32[0][k]][key], torch32[1].state[torch32[0][k]][key],
                   exact[1].state[exact[0][k]][key]) for key in ("row_var", "col_var")]
        for a, b, x in pairs:
            err_ours = (a.double() - x).abs().max().item()
            err_torch = (b.double() - x).abs().max().item()
            assert err_ours <= max(err_torch, 1e-6), (shapes[k], err_ours, err_torch)
        # (the updates reach ~20 here: absolute errors of ~20 float64 ulps of them)
        torch.testing.assert_close(ours64[0][k], exact[0][k], rtol=1e-12, atol=1e-11)
        for key in ("row_var", "col_var"):
            torch.testing.assert_close(ours64[1].state[ours64[0][k]][key],
                                       exact[1].state[exact[0][k]][key], **TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("options", OPTIONS[::5], ids=IDS[::5])
def test_low_precision_matches_rounded_reference(options, dtype):
    """16-bit params: the math runs in float, only stored values (params and state) are
    rounded, as in the other kernels. The reference is torch's for-loop in float32 with
    params and state rounded to 16 bits after every step. The sums differ by float32
    rounding (Note [Adafactor's tolerances]), and where a value lies near the midpoint of two
    16-bit numbers that is enough to round it to the other one, which later steps carry on:
    2 ulps of the 16-bit type, relative, with the same floor for values near zero."""
    options = dict(options, eps=(torch.finfo(dtype).eps, options["eps"][1]))  # as ours resolves None
    low = make_model(dtype)
    work = {n: p.detach().float().requires_grad_() for n, p in low.items()}
    ref = build(torch.optim.Adafactor, work, options, foreach=False)
    params = make_model(dtype)
    opt = build(fused_optim.Adafactor, params, options)
    for step in range(10):
        set_grads(params, dtype, step)
        set_grads(low, dtype, step)
        for n, p in work.items():
            p.grad = None if low[n].grad is None else low[n].grad.float()
        opt.step()
        ref.step()
        with torch.no_grad():
            for n, p in work.items():
                p.copy_(p.to(dtype))
            for s in ref.state.values():
                for k, v in s.items():
                    if k != "step":
                        v.copy_(v.to(dtype))
    eps = torch.finfo(dtype).eps
    for n, p in work.items():
        torch.testing.assert_close(params[n].detach(), p.detach().to(dtype), rtol=2 * eps, atol=2 * eps)
        for k, v in ref.state.get(p, {}).items():
            w = opt.state[params[n]][k]
            if k == "step":
                assert torch.equal(w, v)
            else:
                assert w.dtype == dtype
                torch.testing.assert_close(w, v.to(dtype), rtol=2 * eps, atol=2 * eps)


def test_eps1_none_is_the_first_params_finfo_eps():
    """torch's for-loop sets eps1 = finfo(param.dtype).eps at its first param and keeps it
    for the others of the group: a float64 param first makes the float32 ones use float64's."""
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g),
            torch.randn(7, generator=g)]

    def train(cls, **kw):
        ps = [p.clone().requires_grad_() for p in base]
        opt = cls(ps, **kw)
        for step in range(5):
            for i, p in enumerate(ps):
                p.grad = torch.zeros_like(p) if step == 0 else torch.full_like(p, 1e-5 * (i + 1))
            opt.step()
        return ps, opt

    ours = train(fused_optim.Adafactor)
    ref = train(torch.optim.Adafactor, foreach=False)
    for a, b in zip(ours[0], ref[0]):
        torch.testing.assert_close(a, b, **TOL[a.dtype])
    explicit = train(fused_optim.Adafactor, eps=(torch.finfo(torch.float64).eps, 1e-3))
    assert_bitwise(({i: p for i, p in enumerate(ours[0])}, ours[1]),
                   ({i: p for i, p in enumerate(explicit[0])}, explicit[1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bitwise_same_at_every_thread_count(dtype):
    options = dict(lr=0.5, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, weight_decay=0.1, maximize=True)
    old = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(run(fused_optim.Adafactor, options, dtype, steps=4))
        big = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            g = torch.Generator().manual_seed(0)
            p = torch.randn(4100, 1100, generator=g).to(dtype).requires_grad_()
            opt = fused_optim.Adafactor([p])
            for _ in range(2):
                p.grad = torch.randn(p.shape, generator=g).to(dtype)
                opt.step()
            big.append(({"p": p}, opt))
    finally:
        torch.set_num_threads(old)
    assert_bitwise(results[0], results[1], "1 vs 2 threads")
    assert_bitwise(results[0], results[2], "1 vs 3 threads")
    assert_bitwise(big[0], big[1], "multi-block, 1 vs 2 threads")


# Note [Adafactor's division by the row mean] (csrc/cpu/adafactor.cpp): the AVX2 and AVX-512
# copies divide by the row mean with a reciprocal and two corrections where the row's and
# columns' factors keep every quotient in a domain where that is exact, and the baseline
# copy always divides. Grads whose rows and columns are scaled by powers of two from 2^-75
# to 2^60 put factors (means of squares) across float's whole range, rows and columns of
# zeros among them, so that both sides of every bound are taken; a tiny eps1 lets the
# clamped row mean itself leave [2^-60, 2^60].
ISA_SCRIPT = r"""
import sys, torch, fused_optim
out = {"isa": torch.ops.fused_optim._cpu_isa()}
g = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    for eps1 in (None, 1e-38):
        shapes = [(96, 80), (3, 40, 33), (1, 64), (64, 1), (200, 7)]
        ps = [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in shapes]
        opt = fused_optim.Adafactor(ps, lr=0.01, eps=(eps1, 1e-3), weight_decay=0.01)
        for step in range(4):
            for p in ps:
                rows = torch.randint(-75, 61, p.shape[:-1] + (1,), generator=g).float()
                cols = torch.randint(-75, 61, p.shape[-1:], generator=g).float()
                scale = torch.exp2(rows if step % 2 else rows.clamp(max=0) + cols.clamp(max=0))
                grad = torch.randn(p.shape, generator=g) * scale
                grad[..., : p.shape[-1] // 5] = 0.0              # columns of zero factors
                if p.dim() > 1 and p.shape[-2] > 4:
                    grad[..., 1::4, :] = 0.0                     # zero rows
                p.grad = grad.to(dtype)
            opt.step()
        out[(str(dtype), eps1)] = [p.detach().clone() for p in ps] + [
            v for p in ps for v in opt.state[p].values()]
torch.save(out, sys.argv[1])
"""


def test_same_bits_with_every_isa_on_factors_of_every_exponent(tmp_path):
    results, ran = {}, {}
    for isa in ("baseline", "avx2", "avx512"):
        out = tmp_path / f"{isa}.pt"
        env = dict(os.environ, FUSED_OPTIM_ISA=isa, FUSED_OPTIM_FLOAT_LOOPS="avx512")
        subprocess.run([sys.executable, "-c", ISA_SCRIPT, str(out)], env=env, check=True,
                       timeout=300)
        results[isa] = torch.load(out)
        ran[isa] = results[isa].pop("isa")  # (a cap never raises the ISA: the copy that ran)
    copies = [isa for isa in ("avx2", "avx512") if ran[isa] != "baseline"]
    if not copies:
        pytest.skip("no AVX2 on this CPU: only the baseline copy runs, and it always divides")
    for isa in copies:
        for key, tensors in results["baseline"].items():
            assert len(tensors) == len(results[isa][key])
            for i, (a, b) in enumerate(zip(tensors, results[isa][key])):
                assert torch.equal(a, b) or (a.isnan().any() and torch.equal(
                    a.view(torch.int16 if a.element_size() == 2 else torch.int32),
                    b.view(torch.int16 if b.element_size() == 2 else torch.int32))), \
                    f"{key}, tensor {i}: {isa} differs from baseline"


# -- checkpoints, GradScaler, clipping -----------------------------------------------------
def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
def test_state_dict_both_ways(direction):
    options = dict(lr=torch.tensor(0.01), beta2_decay=-0.7, eps=(None, 1e-3), d=1.0,
                   weight_decay=0.1, maximize=False)
    first, second = ((torch.optim.Adafactor, fused_optim.Adafactor) if direction == "torch_to_ours"
                     else (fused_optim.Adafactor, torch.optim.Adafactor))
    # 5 steps in `first`, then 5 more in `second` from its checkpoint; against 10 in torch
    params, opt = run(first, options, torch.float32, steps=5)
    sd = _roundtrip(opt.state_dict())
    params2 = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
    opt2 = build(second, params2, options)
    opt2.load_state_dict(sd)
    for step in range(5, 10):
        set_grads(params2, torch.float32, step)
        opt2.step()
    ref = run(torch.optim.Adafactor, options, torch.float32, steps=10, foreach=False)
    assert_close_trajectory((params2, opt2), ref, TOL[torch.float32], direction)
    # and the checkpoint's contents are torch's: keys, dtypes, shapes
    ref_sd, our_sd = ref[1].state_dict(), opt2.state_dict()
    assert ref_sd["state"].keys() == our_sd["state"].keys()
    for k, s in ref_sd["state"].items():
        assert {key: (v.dtype, v.shape) for key, v in s.items()} == \
               {key: (v.dtype, v.shape) for key, v in our_sd["state"][k].items()}


@pytest.mark.parametrize("dtype", [torch.int64, torch.bfloat16, torch.float64], ids=str)
def test_a_step_of_another_real_dtype_steps_as_torchs(dtype):
    """A `step` state of another real dtype (test_api.py has the elementwise algorithms):
    counted in its dtype, as torch's `step_t += 1` counts it (bfloat16 from 298: 299 ->
    300, 301 -> 300, then 300 again), its value the step's in the update. Params within
    the suite's float32 tolerance of torch's for-loop, every state's dtype and steps equal."""
    options = dict(lr=0.01, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, weight_decay=0.0,
                   maximize=False)
    out = []
    for cls, kw in ((torch.optim.Adafactor, dict(foreach=False)), (fused_optim.Adafactor, {})):
        params, opt = run(cls, options, torch.float32, steps=1, **kw)
        for p in list(opt.state):  # (the params with grads)
            opt.state[p]["step"] = torch.tensor(298).to(dtype)
        for step in range(1, 4):
            set_grads(params, torch.float32, step)
            opt.step()
        out.append((params, opt))
    (theirs, topt), (ours, oopt) = out
    assert len(topt.state) == len(oopt.state) > 0
    for n in theirs:
        torch.testing.assert_close(ours[n], theirs[n], **TOL[torch.float32])
        if theirs[n] not in topt.state:
            continue
        t, o = topt.state[theirs[n]], oopt.state[ours[n]]
        assert o["step"].dtype == t["step"].dtype == dtype
        assert o["step"].item() == t["step"].item()
        assert {k: v.dtype for k, v in o.items()} == {k: v.dtype for k, v in t.items()}


def test_a_made_state_is_not_taken_for_one_to_make():
    """Once each param has its state, a step makes none: Adafactor keeps `variance` for a
    1-D param and the row and column ones for a 2-D one, so a check of every rule key
    (a review, 2026-12-07) would have read a GradScaler's found_inf at every step, which
    waits for a GPU (Note [GradScaler's handoff])."""
    ps = [torch.randn(6, 4, requires_grad=True), torch.randn(5, requires_grad=True)]
    opt = fused_optim.Adafactor(ps, lr=0.01)
    groups = opt.param_groups
    keys = [opt._step_keys(g) for g in groups]
    for p in ps:
        p.grad = torch.randn_like(p)
    assert opt._makes_state(groups, keys)
    opt.step()
    assert not opt._makes_state(groups, keys)


@pytest.mark.parametrize("handoff", [False, True])
def test_grad_scaler_unscales_and_skips_inf_steps(handoff):
    """As torch's for-loop, the scaler unscales and skips the inf step itself; with the
    handoff asked for (Note [GradScaler's handoff]), the kernel does both."""
    options = dict(lr=0.01, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, weight_decay=0.0,
                   maximize=False)
    results = []
    for cls, extra in ((fused_optim.Adafactor, {}), (torch.optim.Adafactor, {"foreach": False})):
        params = make_model(torch.float32)
        opt = build(cls, params, options, **extra)
        if handoff and cls is fused_optim.Adafactor:
            opt._step_supports_amp_scaling = True
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
        scaler.scale(torch.ones(()))  # (its scale is made by the first scale() call)
        for step in range(6):
            set_grads(params, torch.float32, step)
            for p in params.values():
                if p.grad is not None:
                    p.grad.mul_(scaler.get_scale())
            if step == 3:
                params["matrix"].grad[2, 5] = float("inf")
                before = ({n: p.detach().clone() for n, p in params.items()},
                          copy.deepcopy(opt.state_dict()))
            scaler.step(opt)
            scaler.update()
            if step == 3:  # the inf step changed nothing
                for n, p in params.items():
                    assert torch.equal(p, before[0][n]), n
                after = opt.state_dict()
                for k, s in before[1]["state"].items():
                    for key, v in s.items():
                        assert torch.equal(after["state"][k][key], v), (k, key)
        results.append((params, opt))
    assert results[0][1]._step_supports_amp_scaling == handoff
    assert_close_trajectory(results[0], results[1], TOL[torch.float32], "GradScaler")


def test_max_grad_norm_matches_clip_then_step():
    options = dict(lr=0.5, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, weight_decay=0.1,
                   maximize=False)
    params = make_model(torch.float32)
    opt = build(fused_optim.Adafactor, params, options, max_grad_norm=5.0)
    ref_params = make_model(torch.float32)
    ref = build(torch.optim.Adafactor, ref_params, options, foreach=False)
    for step in range(5):
        set_grads(params, torch.float32, step)
        set_grads(ref_params, torch.float32, step)
        opt.step()
        torch.nn.utils.clip_grad_norm_([p for p in ref_params.values() if p.grad is not None], 5.0)
        ref.step()
    assert_close_trajectory((params, opt), (ref_params, ref), TOL[torch.float32], "max_grad_norm")


# -- the torch.optim contract: signature, defaults, errors ---------------------------------
def test_signature_and_defaults_match_torch():
    ours = inspect.signature(fused_optim.Adafactor.__init__).parameters
    ref = inspect.signature(torch.optim.Adafactor.__init__).parameters
    assert list(ours)[:len(ref)] == list(ref)
    assert list(ours)[len(ref):] == ["max_grad_norm", "grad_norm_type"]
    assert ours["max_grad_norm"].default is None and ours["grad_norm_type"].default == 2.0
    for key, p in ref.items():
        assert ours[key].kind == p.kind and ours[key].default == p.default, key
    ps = [torch.randn(3, 4, requires_grad=True)]
    assert fused_optim.Adafactor(ps).defaults == torch.optim.Adafactor(ps).defaults
    assert fused_optim.Adafactor is not torch.optim.Adafactor
    assert issubclass(fused_optim.Adafactor, torch.optim.Adafactor)
    assert "Adafactor" in fused_optim.FUSED and "Adafactor" not in fused_optim.TORCH_OWN


def _error_of(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return type(e), str(e)
    return None


@pytest.mark.parametrize("kwargs", [
    dict(lr=-1.0), dict(lr=torch.tensor([0.1, 0.2])), dict(beta2_decay=0.1),
    dict(eps=(-1.0, 1e-3)), dict(eps=(None, -1.0)), dict(eps=(1e-3,)), dict(d=0.5),
    dict(weight_decay=-0.1),
], ids=str)
def test_bad_hyperparameters_raise_torchs_error(kwargs):
    ps = [torch.randn(3, 4, requires_grad=True)]
    ref = _error_of(lambda: torch.optim.Adafactor(ps, **kwargs))
    assert ref is not None
    with pytest.raises(ref[0], match=re.escape(ref[1])):
        fused_optim.Adafactor(ps, **kwargs)


def _step_errors(make_params, **kwargs):
    """torch's error and ours for one step, and whether ours changed anything."""
    errors = []
    for cls in (torch.optim.Adafactor, fused_optim.Adafactor):
        ps = make_params()
        opt = cls(ps, **kwargs)
        if cls is fused_optim.Adafactor:
            before = [p.detach().clone() for p in ps]
        errors.append(_error_of(opt.step))
    assert all(torch.equal(a, b) for a, b in zip(ps, before)), "a failed step changed a param"
    return errors


@pytest.mark.parametrize("case", ["eps_of_three", "complex", "sparse", "zero_size"])
def test_bad_input_raises_torchs_error_and_changes_nothing(case):
    g = torch.Generator().manual_seed(0)

    def make_params():
        ps = [torch.randn(4, 3, generator=g).requires_grad_(), torch.randn(5, generator=g).requires_grad_()]
        if case == "complex":
            ps.append(torch.randn(3, dtype=torch.complex64).requires_grad_())
        if case == "zero_size":
            ps.append(torch.randn(0, 3).requires_grad_())
        for p in ps:
            p.grad = torch.randn_like(p)
        if case == "sparse":
            ps[1].grad = ps[1].grad.to_sparse()
        return ps

    kwargs = dict(eps=(None, 1e-3, 1.0)) if case == "eps_of_three" else {}
    ref, ours = _step_errors(make_params, **kwargs)
    assert ref is not None and ours == ref


@pytest.mark.parametrize("option,value,error", [("d", 0.0, ZeroDivisionError),
                                                 ("d", 0, ZeroDivisionError),
                                                 ("beta2_decay", 1100.0, OverflowError)])
def test_host_arithmetic_of_a_group_raises_torchs_error_and_changes_nothing(option, value, error):
    """torch's for-loop divides by numel ** 0.5 * d and raises step ** beta2_decay as Python
    floats: a group added with d=0 or beta2_decay > 0 (the constructor refuses them) made it
    raise ZeroDivisionError or OverflowError (at the second step: 1 ** x is 1). Ours ran the
    kernel, whose division and pow gave inf: params that never moved, or NaN params, without
    an error (found by a review, 2026-12-06). Now the same error, before anything changes
    (torch's, after updating the params before)."""
    outcomes = []
    for cls in (torch.optim.Adafactor, fused_optim.Adafactor):
        g = torch.Generator().manual_seed(0)
        a = torch.randn(4, 6, generator=g).requires_grad_()
        b = torch.randn(5, generator=g).requires_grad_()
        opt = cls([a], lr=0.1)
        opt.add_param_group({"params": [b], option: value})
        for step in range(2):
            for p in (a, b):
                p.grad = torch.randn(p.shape, generator=g)
            if cls is fused_optim.Adafactor:
                before = [t.clone() for t in (a.detach(), b.detach())] + [
                    t.clone() for s in opt.state.values() for t in s.values()]
            try:
                opt.step()
            except Exception as e:  # noqa: BLE001 (the error is compared below)
                outcomes.append((step, type(e), str(e)))
                if cls is fused_optim.Adafactor:
                    after = [a.detach(), b.detach()] + [t for s in opt.state.values() for t in s.values()]
                    assert len(after) == len(before)
                    assert all(torch.equal(x, y) for x, y in zip(before, after)), "changed"
                break
        else:
            outcomes.append(None)
    assert outcomes[0] is not None and outcomes[0][1] is error
    assert outcomes[0] == outcomes[1]


@pytest.mark.parametrize("case", ["complex in the group", "complex in an earlier group",
                                  "sparse in the group"])
def test_torchs_param_checks_come_before_the_host_arithmetic(case):
    """torch's step checks each group's params (complex, sparse) before it computes with
    d or beta2_decay: a complex param with d=0 set in a group is its complex error, not a
    ZeroDivisionError (the host arithmetic's check came first, found by a review of it)."""
    outcomes = []
    for cls in (torch.optim.Adafactor, fused_optim.Adafactor):
        g = torch.Generator().manual_seed(0)
        a = torch.randn(4, 6, generator=g).requires_grad_()
        b = torch.randn(5, generator=g).requires_grad_()
        odd = torch.randn(3, dtype=torch.complex64, generator=g).requires_grad_()
        first = [a, odd] if case == "complex in an earlier group" else [a]
        second = [b, odd] if case == "complex in the group" else [b]
        opt = cls(first, lr=0.1)
        opt.add_param_group({"params": second, "d": 0.0})
        for p in (a, b, odd):
            p.grad = torch.randn(p.shape, dtype=p.dtype, generator=g)
        if case == "sparse in the group":
            b.grad = b.grad.to_sparse()
        before = [t.detach().clone() for t in (a, b)]
        with pytest.raises(RuntimeError) as e:
            opt.step()
        outcomes.append(str(e.value))
        if cls is fused_optim.Adafactor:
            assert all(torch.equal(x, y.detach()) for x, y in zip(before, (a, b)))
    assert outcomes[0] == outcomes[1] and "does not support" in outcomes[0]


def test_op_refuses_bad_lists_before_changing_anything():
    p, g = torch.randn(4, 3), torch.randn(4, 3)
    row, col, step = torch.zeros(4, 1), torch.zeros(1, 3), torch.tensor(0.0)
    op = torch.ops.fused_optim.adafactor_
    with pytest.raises(RuntimeError, match="row_var and a col_var"):
        op([p], [g], [], [], [torch.zeros(4, 3)], [step], 0.01, -0.8, None, 1e-3, 1.0, 0.0, False)
    with pytest.raises(RuntimeError, match="must have shape"):
        op([p], [g], [torch.zeros(4, 3)], [col], [], [step], 0.01, -0.8, None, 1e-3, 1.0, 0.0, False)
    assert step.item() == 0.0 and not row.any()


def test_opcheck():
    g = torch.Generator().manual_seed(0)
    ps = [torch.randn(4, 3, generator=g), torch.randn(5, generator=g), torch.randn(2, 3, 4, generator=g)]
    gs = [torch.randn(p.shape, generator=g) for p in ps]
    rows = [torch.rand(4, 1), torch.rand(2, 3, 1)]
    cols = [torch.rand(1, 3), torch.rand(2, 1, 4)]
    var = [torch.rand(5)]
    steps = [torch.tensor(1.0) for _ in ps]
    torch.library.opcheck(torch.ops.fused_optim.adafactor_.default,
                          (ps, gs, rows, cols, var, steps, 0.01, -0.8, None, 1e-3, 1.0, 0.1, True))
    torch.library.opcheck(torch.ops.fused_optim.adafactor_.default,
                          (ps, gs, rows, cols, var, steps, 0.0, -0.8, 1e-6, 1e-3, 2.0, 0.0, False,
                           torch.tensor(0.01), torch.tensor(4.0), torch.tensor(0.0)))


def test_benchmark_probe_takes_adafactors_pattern():
    """benchmarks/bench.py's bandwidth probe streams Adafactor's pattern: 1 inout, 4 read-only
    (Note [Adafactor's passes])."""
    x = torch.ones(100)
    reads = [torch.full((100,), float(k)) for k in range(4)]
    fused_optim._ops.stream_([x], reads, 0.5)
    assert torch.equal(x, torch.full((100,), 0.5 + 6.0))


@pytest.mark.parametrize("value", ["many", "-5", "1e6"])
def test_a_bad_wave_variable_is_a_clear_error_before_anything_changes(value):
    """FUSED_OPTIM_ADAFACTOR_WAVE (Note [Adafactor's waves]) is read once, at the first
    step: a value it cannot use raises torch's RuntimeError naming the variable and the
    value, before the step is counted or any param or state element changes."""
    script = (
        "import torch, fused_optim\n"
        "p = torch.randn(40, 30, requires_grad=True); p.grad = torch.randn(40, 30)\n"
        "before = p.detach().clone()\n"
        "opt = fused_optim.Adafactor([p])\n"
        "try:\n"
        "    opt.step()\n"
        "except RuntimeError as e:\n"
        "    st = opt.state[p]\n"
        "    print('ERROR', str(e).splitlines()[0])\n"
        "    print('UNCHANGED', torch.equal(p.detach(), before)\n"
        "          and all(float(st[k].abs().sum()) == 0 for k in st if k != 'step')\n"
        "          and float(st['step']) == 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, FUSED_OPTIM_ADAFACTOR_WAVE=value))
    assert out.returncode == 0, out.stderr
    assert "FUSED_OPTIM_ADAFACTOR_WAVE must be auto, off or a number of elements" in out.stdout
    assert f"not {value}" in out.stdout
    assert "UNCHANGED True" in out.stdout, out.stdout


@pytest.mark.parametrize("shape", [(4,), (2, 2)], ids=["1d", "2d"])
def test_a_param_whose_norm_overflows_float_steps_to_torchs_infinities(shape):
    """torch's param.norm(2) of a float32 param sums its squares in float: a param of 1e20
    has an infinite RMS, so an infinite step size. The kernel added the squares in double
    and stepped to finite values (found by a review, 2026-12-05); it now takes a sum past
    float's largest value as torch's inf (Note [Adafactor's sums]). Same infinities and
    NaNs, same finite values."""
    out = []
    for cls, kw in ((torch.optim.Adafactor, dict(foreach=False)), (fused_optim.Adafactor, {})):
        p = torch.tensor([1e20, 1.0, 2.0, 3.0]).reshape(shape).requires_grad_()
        opt = cls([p], lr=0.01, **kw)
        p.grad = torch.tensor([0.5, 0.1, -0.2, 0.3]).reshape(shape)
        opt.step()
        out.append(p.detach().clone())
    assert not out[0].isfinite().any()
    torch.testing.assert_close(out[1], out[0], equal_nan=True, rtol=0, atol=0)


def test_a_step_inside_autocast_runs_torchs_step():
    """torch's Adafactor computes row_var @ col_var with a matmul, which autocast runs in
    bfloat16; inside `torch.autocast("cpu")` fused_optim runs torch's step, with a warning,
    and its params and state are torch's bit for bit (the kernel's float32 product was 2e-4
    off them, found by a review). Outside autocast the kernel runs again."""
    import warnings

    runs = []
    # (the warning is once per process: forget it, so that the test does not depend on
    # whether another test, or an earlier run in this process, gave it)
    warned = fused_optim.optimizer.FusedOptimizer._warned
    warned.difference_update({k for k in warned if k[0] == "Adafactor" and "autocast" in k[1]})
    for cls in (torch.optim.Adafactor, fused_optim.Adafactor):
        g = torch.Generator().manual_seed(0)
        ps = [torch.randn(16, 32, generator=g).requires_grad_(), torch.randn(5, generator=g).requires_grad_()]
        opt = cls(ps, lr=0.01)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(3):
                for p in ps:
                    p.grad = torch.randn(p.shape, generator=g)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    opt.step()
        runs.append((ps, opt, [str(w.message) for w in caught]))
    (ref, ref_opt, _), (ours, ours_opt, messages) = runs
    for p, q in zip(ours, ref):
        assert torch.equal(p, q)
        for k, v in ref_opt.state[q].items():
            assert torch.equal(ours_opt.state[p][k], v), k
    assert any("inside torch.autocast('cpu')" in m for m in messages), messages
