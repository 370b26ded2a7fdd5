"""Gradient clipping by global norm (issue 20): fused_optim.clip_grad_norm_ and friends
against torch.nn.utils', and clipping inside the step (max_grad_norm=) against
clip_grad_norm_ followed by the step. Every comparison is bitwise (torch.equal): the norm
kernel adds in the order torch's does (Note [global norm] in csrc/cpu/grad_norm.cpp), and
the step's clipping is the same products (Note [clipping in the step] in clip.py)."""
import copy
import os
import subprocess
import sys
import warnings

import pytest
import torch

import fused_optim
from fused_optim import clip as fclip

from parity_utils import ALGOS, OPTIONS, make_model, materialize, set_grads

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
def _model(dtype, seed=0):
    """Every layout of the parity suite but complex (complex grads go to torch's own norm:
    tested on their own)."""
    params = make_model(dtype, seed=seed)
    params.pop("complex", None)
    return params


def _grads(params, dtype, step=0, scale=1.0):
    set_grads(params, dtype, step)
    if scale != 1.0:
        with torch.no_grad():
            for p in params.values():
                if p.grad is not None:
                    p.grad.mul_(scale)


def _clone_grads(params):
    out = {}
    for n, p in params.items():
        q = p.detach().clone().requires_grad_()
        # Same strides as the original grad (clone keeps dense layouts; a strided grad
        # gets a same-strided copy).
        q.grad = None if p.grad is None else torch.empty_strided(
            p.grad.shape, p.grad.stride(), dtype=p.grad.dtype).copy_(p.grad)
        out[n] = q
    return out


def _assert_grads_equal(a, b):
    for n in a:
        ga, gb = a[n].grad, b[n].grad
        assert (ga is None) == (gb is None), n
        if ga is not None:
            assert torch.equal(ga, gb), f"grad {n}"


# Every kind of norm torch's kernel tells apart (Note [global norm]): 2 (its vector loop),
# inf and -inf (largest and smallest |x|), 0 (a count), 1, and pow's for any other p
# (fractional, above 2, negative).
NORM_TYPES = [2.0, float("inf"), 1.0, 0.0, 0.5, 3.0, -1.0, float("-inf")]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("max_norm", [0.5, 1e6])  # clips, and does not (coefficient 1)
def test_clip_grad_norm_bitwise_torch(dtype, norm_type, max_norm, threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours = _model(dtype)
        if norm_type == float("inf") or norm_type < 0:
            # an error (no identity): test_errors_and_edge_cases_as_torch,
            # test_empty_grad_norm_error_follows_foreach
            ours.pop("zero_size")
        _grads(ours, dtype, step=3, scale=7.0)
        ref = _clone_grads(ours)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the kernels take all of these: no fallback
            n_ours = fused_optim.clip_grad_norm_(ours.values(), max_norm, norm_type)
        n_ref = torch.nn.utils.clip_grad_norm_(ref.values(), max_norm, norm_type)
        assert n_ours.dtype == n_ref.dtype and n_ours.shape == n_ref.shape
        assert torch.equal(n_ours, n_ref), (n_ours.item(), n_ref.item())
        _assert_grads_equal(ours, ref)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_bitwise_on_every_length_and_scale(dtype):
    # Lengths around the 4-, 8- and 16-element steps of torch's accumulator and leftover
    # loop, 40 tensors of each short length (a wrong order shows in the last bit of about
    # one norm in ten: one tensor per length missed it), and long ones; values over many
    # magnitudes.
    g = torch.Generator().manual_seed(5)
    lengths = [n for n in range(1, 40) for _ in range(40)] + [255, 256, 257, 4099, 65537, 300001]
    tensors = [(torch.randn(n, generator=g, dtype=torch.float64)
                * 10.0 ** torch.randint(-3, 4, (n,), generator=g)).to(dtype) for n in lengths]
    norms = torch.ops.fused_optim._norms(tensors, 2.0)
    for t, n in zip(tensors, norms):
        assert torch.equal(n, torch.linalg.vector_norm(t)), t.numel()
    assert torch.equal(fused_optim.get_total_norm(tensors), torch.nn.utils.get_total_norm(tensors))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_norm_type_bitwise_on_every_length_and_scale(dtype, threads):
    # torch's generic reduction (every norm type but the 2-norm of float32, float64 and
    # bfloat16): one chain per thread's run from 32,768 elements on (at::parallel_for's
    # split at 2 threads), so lengths on both sides of it and of two runs' boundary; values
    # over many magnitudes with zeros (the 0-"norm" counts them; pow(0, p) for negative p
    # is inf); a dense transposed tensor; the grads unscaled first (a GradScaler's 1/scale,
    # a power of two and not), rounded to their dtype, as unscale_ leaves them.
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(7)
        tensors = []
        # (and 40 short lengths, a one-element tensor among them: the kernel advances eight
        # tensors' chains in lockstep, each handing its lane on as it ends, Note
        # [interleaved chains])
        short = torch.randint(2, 3000, (40,), generator=g).tolist()
        for n in [2, 3, 7, 17, 100, 32767, 32768, 65537, 100001] + short[:20] + [1] + short[20:]:
            t = (torch.randn(n, generator=g, dtype=torch.float64)
                 * 10.0 ** torch.randint(-2, 3, (n,), generator=g))
            t[torch.rand(n, generator=g) < 0.05] = 0.0
            tensors.append(t.to(dtype))
        tensors.append(torch.randn(40, 30, generator=g, dtype=torch.float64).to(dtype).t())
        for norm_type in NORM_TYPES + [1.5, -2.0, 2.5, float("nan")]:
            for inv_scale in (1.0, 2.0**-10, 1e-3):
                norms = torch.ops.fused_optim._norms(tensors, norm_type, inv_scale)
                for t, n in zip(tensors, norms):
                    r = torch.linalg.vector_norm(t if inv_scale == 1.0 else t.mul(inv_scale),
                                                 norm_type)
                    assert n.dtype == r.dtype
                    assert torch.equal(n, r) or (n.isnan() and r.isnan()), (
                        t.shape, norm_type, inv_scale, n.item(), r.item())
            total = fused_optim.get_total_norm(tensors, norm_type)
            ref = torch.nn.utils.get_total_norm(tensors, norm_type)
            assert torch.equal(total, ref) or (total.isnan() and ref.isnan()), norm_type
    finally:
        torch.set_num_threads(old)


def test_every_float16_value_widens_as_torchs_in_the_norms():
    # The chains of float16 tensors widen their elements a block at a time with their own
    # copy of c10's conversion (widen_half_bits in csrc/cpu/grad_norm.cpp): every finite
    # float16 value, 64 consecutive bit patterns a tensor (so a wrong one shows in its
    # tensor's sum), in enough tensors that eight chains run side by side; then inf and NaN.
    bits = torch.arange(0, 1 << 16, dtype=torch.int32)
    finite = bits[(bits & 0x7C00) != 0x7C00].to(torch.int16).view(torch.float16)
    tensors = list(finite.split(64))
    for norm_type in (1.0, 0.5, 2.0, 0.0):
        norms = torch.ops.fused_optim._norms(tensors, norm_type)
        for t, n in zip(tensors, norms):
            assert torch.equal(n, torch.linalg.vector_norm(t, norm_type)), (norm_type, t[:2])
    special = bits[(bits & 0x7C00) == 0x7C00].to(torch.int16).view(torch.float16)
    tensors = [torch.cat([torch.ones(63, dtype=torch.float16), v.view(1)]) for v in special]
    for norm_type in (1.0, 2.0):
        norms = torch.ops.fused_optim._norms(tensors, norm_type)
        for t, n in zip(tensors, norms):
            r = torch.linalg.vector_norm(t, norm_type)
            assert torch.equal(n, r) or (n.isnan() and r.isnan()), t[-1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_norms_with_denormals_flushed_as_torchs(dtype):
    """Found by a review (2026-12-07): torch.set_flush_denormal(True) flushes subnormals on
    the calling thread only, where torch computes each norm (but the later runs of a split
    one); the kernel's other thread took its own MXCSR, so the 0-norm of subnormals counted
    them where torch's did not. Now the caller's, as torch (Note [the norms' MXCSR])."""
    tiny = {torch.float32: 1e-39, torch.float64: 1e-310, torch.float16: 1e-7}[dtype]
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(3)
    # subnormals alone and among normal values, short tensors and split ones
    tensors = [torch.full((50,), tiny, dtype=dtype) for _ in range(6)]
    tensors += [(torch.randn(n, generator=g, dtype=torch.float64) * tiny).to(dtype)
                for n in (7, 300, 40000, 70001)]
    mixed = torch.randn(70001, generator=g, dtype=torch.float64)
    mixed[::3] *= tiny
    tensors.append(mixed.to(dtype))
    if not torch.set_flush_denormal(True):
        torch.set_num_threads(old)
        pytest.skip("this CPU cannot flush denormals")
    try:
        for norm_type in (0.0, 1.0, 2.0, 0.5, 3.0, float("inf"), float("-inf")):
            norms = torch.ops.fused_optim._norms(tensors, norm_type)
            for t, n in zip(tensors, norms):
                assert torch.equal(n, torch.linalg.vector_norm(t, norm_type)), (
                    norm_type, t.numel(), n.item(), torch.linalg.vector_norm(t, norm_type).item())
            assert torch.equal(fused_optim.get_total_norm(tensors, norm_type),
                               torch.nn.utils.get_total_norm(tensors, norm_type))
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(old)


def test_norms_split_as_torchs_under_an_openmp_thread_limit():
    """Found by a review (2026-12-07): torch splits a norm of 32,768 elements or more among
    the threads OpenMP starts, which OMP_THREAD_LIMIT caps below at::get_num_threads():
    the kernel split by the latter. (A fresh process: OpenMP reads the limit at its start.)"""
    code = (
        "import torch, fused_optim\n"
        "assert torch.get_num_threads() == 2\n"
        "g = torch.Generator().manual_seed(0)\n"
        "for dt in (torch.float32, torch.float16):\n"
        "    t = torch.randn(100001, generator=g).to(dt)\n"
        "    for p in (1.0, 3.0, 2.0):\n"
        "        n = torch.ops.fused_optim._norms([t], p)[0]\n"
        "        assert torch.equal(n, torch.linalg.vector_norm(t, p)), (dt, p)\n"
        "print('ok')\n")
    env = dict(os.environ, OMP_NUM_THREADS="2", OMP_THREAD_LIMIT="1",
               PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_norms_when_the_pool_threads_flush_denormals_and_the_caller_does_not():
    """Found by a review (2026-12-07): OpenMP threads made while set_flush_denormal(True)
    was on keep flushing after the caller stops. torch computes run j of a split norm on
    its thread j, under that thread's MXCSR: so does the kernel (Note [the norms' MXCSR]),
    where the largest and smallest |x| had the caller's. A fresh process: the pool's
    threads keep the setting for the rest of it."""
    code = (
        "import torch\n"
        "torch.set_num_threads(2)\n"
        "if not torch.set_flush_denormal(True): print('ok'); raise SystemExit\n"
        "torch.linalg.vector_norm(torch.ones(200000), 1)  # the pool's threads, flushing\n"
        "torch.set_flush_denormal(False)\n"
        "import fused_optim\n"
        "g = torch.Generator().manual_seed(0)\n"
        "tiny = {torch.float32: 1e-39, torch.float64: 1e-310, torch.float16: 1e-7}\n"
        "for dt, t in tiny.items():\n"
        "    m = torch.randn(70001, generator=g, dtype=torch.float64)\n"
        "    m[::2] *= t\n"
        "    u = torch.zeros(70001, dtype=torch.float64)\n"
        "    u[40000] = 2 * t\n"
        "    for x in (m.to(dt), u.to(dt), (u + 1).to(dt)):\n"
        "        for p in (0.0, 1.0, 2.0, 3.0, float('inf'), float('-inf')):\n"
        "            for inv in (1.0, 0.5):\n"
        "                n = torch.ops.fused_optim._norms([x], p, inv)[0]\n"
        "                r = torch.linalg.vector_norm(x if inv == 1.0 else x.mul(inv), p)\n"
        "                assert torch.equal(n, r), (dt, p, inv, n.item(), r.item())\n"
        "print('ok')\n")
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_the_inf_norms_of_nans_are_torchs_nan(dtype):
    # torch's largest and smallest |x| of a tensor holding NaNs is the default NaN, whatever
    # the elements' payloads (a review found ours kept an element's, 2026-12-07).
    bits = {torch.float32: (torch.int32, [0x7FC00001, 0x7FC00002]),
            torch.float64: (torch.int64, [0x7FF8000000000001, 0x7FF8000000000002]),
            torch.bfloat16: (torch.int16, [0x7FC1, 0x7FC2])}[dtype]
    t = torch.randn(100, dtype=dtype)
    t.view(bits[0])[17] = bits[1][0]
    t.view(bits[0])[60] = bits[1][1]
    for norm_type in (float("inf"), float("-inf")):
        n = torch.ops.fused_optim._norms([t], norm_type)[0]
        r = torch.linalg.vector_norm(t, norm_type)
        assert n.view(bits[0]).item() == r.view(bits[0]).item(), norm_type


@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_of_one_element_is_its_magnitude_as_torchs(dtype):
    # torch's norm of a one-element tensor is |x|, where squaring it would over- or underflow
    # (1e20 in float32, 1e-30) or round (1e-20): the norms, and the clipping of a lone
    # scalar grad by them, as torch's (NaN where torch's is NaN).
    def same(a, b):
        return a.dtype == b.dtype and a.shape == b.shape and bool(
            ((a == b) | (a.isnan() & b.isnan())).all())

    big, small, tiny = (6e4, 1e-7, 3e-5) if dtype == torch.float16 else (1e20, 1e-30, 1e-20)
    for shape in ((), (1,), (1, 1)):
        for v in (big, -big, small, tiny, -3.0, float("nan"), 0.0, -0.0):
            t = torch.full(shape, v, dtype=dtype)
            # (every norm type: |x|, and for 0 whether x is not 0)
            for norm_type in NORM_TYPES + [float("nan")]:
                assert same(torch.ops.fused_optim._norms([t], norm_type)[0],
                            torch.linalg.vector_norm(t, norm_type)), (shape, v, norm_type)
            p = torch.zeros(shape, dtype=dtype).requires_grad_()
            p.grad = t.clone()
            q = torch.zeros(shape, dtype=dtype).requires_grad_()
            q.grad = t.clone()
            n_ours = fused_optim.clip_grad_norm_([p], 1.0)
            n_ref = torch.nn.utils.clip_grad_norm_([q], 1.0)
            assert same(n_ours, n_ref) and same(p.grad, q.grad), (shape, v)


@pytest.mark.parametrize("max_norm", [0.5, 1e6])  # clips, and does not (multiplies by 1)
@pytest.mark.parametrize("dtypes", ["one", "mixed"])  # the fast path, the grouped one
@pytest.mark.parametrize("fn", ["clip_grad_norm_", "clip_grads_with_norm_"])
def test_clipping_counts_a_write_to_each_grad_as_torchs(fn, dtypes, max_norm):
    # torch multiplies the grads in place, by 1 too: each grad's version counter moves, so a
    # graph that saved a grad (create_graph=True, a gradient penalty) refuses to run after.
    def run(module):
        dts = [torch.float32] * 3 if dtypes == "one" else [torch.float32, torch.bfloat16,
                                                            torch.float64]
        ps = [torch.ones(5, dtype=dt, requires_grad=True) for dt in dts]
        loss = sum((p.double() ** 3).sum() for p in ps)
        grads = torch.autograd.grad(loss, ps, create_graph=True)
        for p, g in zip(ps, grads):
            p.grad = g
        penalty = sum((g ** 2).sum().double() for g in grads)  # (pow saves g itself)
        before = [g._version for g in grads]
        if fn == "clip_grad_norm_":
            module.clip_grad_norm_(ps, max_norm)
        else:
            module.clip_grads_with_norm_(ps, max_norm, module.get_total_norm(grads))
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            penalty.backward()
        return [g._version - b for g, b in zip(grads, before)]

    assert run(fused_optim) == run(torch.nn.utils)


def test_a_total_norm_not_0_dim_is_torchs_business():
    # torch's foreach multiply refuses a coefficient of shape [1]; ours hands it over.
    for cls_fn in (fused_optim.clip_grads_with_norm_, torch.nn.utils.clip_grads_with_norm_):
        p = torch.ones(3, requires_grad=True)
        p.grad = torch.full((3,), 2.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(RuntimeError, match="scalar tensor expected to be 0 dim"):
                cls_fn([p], 1.0, torch.tensor([4.0]))
        assert torch.equal(p.grad, torch.full((3,), 2.0))


def test_non_dense_and_mixed_dtype_grads():
    # A strided grad that is not dense (torch's own norm, on the calling thread) and
    # grads of several dtypes (grouped and stacked in torch's order).
    ps = [torch.randn(20, 30, dtype=dt).requires_grad_()
          for dt in (torch.float32, torch.bfloat16, torch.float32, torch.float64)]
    for i, p in enumerate(ps):
        p.grad = torch.randn(20, 60, dtype=p.dtype)[:, ::2] * (i + 1)
    ref = [p.detach().clone().requires_grad_() for p in ps]
    for p, q in zip(ps, ref):
        q.grad = p.grad.clone()
    n_ours = fused_optim.clip_grad_norm_(ps, 1.0)
    n_ref = torch.nn.utils.clip_grad_norm_(ref, 1.0)
    assert n_ours.dtype == n_ref.dtype and torch.equal(n_ours, n_ref)
    for p, q in zip(ps, ref):
        assert torch.equal(p.grad, q.grad)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0])
def test_complex_grads_run_torch_with_a_warning(norm_type):
    p = torch.randn(50, dtype=torch.complex64).requires_grad_()
    p.grad = torch.randn(50, dtype=torch.complex64)
    q = p.detach().clone().requires_grad_()
    q.grad = p.grad.clone()
    fclip._warned.clear()
    with pytest.warns(UserWarning, match="torch.complex64 grads"):
        n = fused_optim.clip_grad_norm_([p], 0.1, norm_type=norm_type)
    assert torch.equal(n, torch.nn.utils.clip_grad_norm_([q], 0.1, norm_type=norm_type))
    assert torch.equal(p.grad, q.grad)


def test_errors_and_edge_cases_as_torch():
    p = torch.randn(10).requires_grad_()
    p.grad = torch.randn(10)
    p.grad[3] = float("inf")
    msg = "The total norm of order 2.0 for gradients from `parameters` is non-finite"
    with pytest.raises(RuntimeError, match=msg):
        torch.nn.utils.clip_grad_norm_([p], 1.0, error_if_nonfinite=True)
    with pytest.raises(RuntimeError, match=msg):
        fused_optim.clip_grad_norm_([p], 1.0, error_if_nonfinite=True)
    # Not asked to raise: both scale by the non-finite norm.
    q = p.detach().clone().requires_grad_()
    q.grad = p.grad.clone()
    assert torch.equal(fused_optim.clip_grad_norm_([p], 1.0), torch.nn.utils.clip_grad_norm_([q], 1.0))
    torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, equal_nan=True)
    # The inf-norm of an empty grad: torch's error.
    e = torch.zeros(0, 3, requires_grad=True)
    e.grad = torch.zeros(0, 3)
    # (torch 2.13's message names _foreach_norm; torch 2.8's CPU op raised linalg.vector_norm's)
    msg = "cannot compute the inf(inity)? norm on an empty tensor"
    with pytest.raises(RuntimeError, match=msg) as theirs:
        torch.nn.utils.clip_grad_norm_([e, p], 1.0, norm_type="inf")
    with pytest.raises(RuntimeError, match=msg) as ours:
        fused_optim.clip_grad_norm_([e, p], 1.0, norm_type="inf")
    assert str(ours.value) == str(theirs.value)
    # No grads: tensor(0.), grads untouched; a single tensor; an empty generator warns.
    r = torch.randn(4).requires_grad_()
    assert torch.equal(fused_optim.clip_grad_norm_([r], 1.0), torch.tensor(0.0))
    r.grad = torch.full((4,), 3.0)
    assert torch.equal(fused_optim.clip_grad_norm_(r, 1.0), torch.tensor(6.0))
    assert torch.equal(r.grad, torch.full((4,), 3.0) * torch.clamp(1.0 / (torch.tensor(6.0) + 1e-6), max=1.0))
    with pytest.warns(UserWarning, match="empty generator"):
        fused_optim.clip_grad_norm_((x for x in []), 1.0)


# -- clipping inside the step ------------------------------------------------------------

def _first_options(name):
    return OPTIONS[name][0]


def _pair(name, dtype, max_norm, **extra):
    """(ours, reference): ours clips in the step; the reference is the same fused class
    without it, after fused_optim.clip_grad_norm_ (itself bitwise torch's, above)."""
    _, cls = ALGOS[name]
    options = _first_options(name)
    p1, p2 = _model(dtype), _model(dtype)
    names = list(p1)
    half = len(names) // 2

    def groups(params):
        return [{"params": [params[n] for n in names[:half]], **materialize(options, 0)},
                {"params": [params[n] for n in names[half:]], **materialize(options, 1)}]
    ours = cls(groups(p1), max_grad_norm=max_norm, **extra)
    ref = cls(groups(p2), **extra)
    return (p1, ours), (p2, ref)


def _assert_same(a, b):
    (pa, oa), (pb, ob) = a, b
    for n in pa:
        assert torch.equal(pa[n].detach(), pb[n].detach()), f"param {n}"
        sa, sb = oa.state.get(pa[n], {}), ob.state.get(pb[n], {})
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"state {n}.{k}"
    _assert_grads_equal(pa, pb)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(ALGOS))
def test_max_grad_norm_is_clip_then_step(name, dtype):
    ours, ref = _pair(name, dtype, max_norm=2.0)
    for step in range(4):
        # Steps 0-2 clip (the grads' norm is far above 2), step 3 does not.
        scale = 1.0 if step < 3 else 1e-3
        _grads(ours[0], dtype, step, scale)
        _grads(ref[0], dtype, step, scale)
        ours[1].step()
        norm = fused_optim.clip_grad_norm_(ref[0].values(), 2.0)
        ref[1].step()
        assert torch.equal(ours[1].last_grad_norm, norm)
        _assert_same(ours, ref)


@pytest.mark.parametrize("max_norm", [2.0, 1e6])  # clips, and does not (coefficient 1)
@pytest.mark.parametrize("init_scale", [2.0**16, 3000.0])  # a power of two, and not
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # (unscale_ refuses float16)
@pytest.mark.parametrize("name", ["Adam", "SGD", "Adagrad"])
def test_max_grad_norm_with_grad_scaler(name, dtype, init_scale, max_norm):
    # ours: scaler.step(opt) with max_grad_norm; reference: torch's recipe, unscale_,
    # clip_grad_norm_, scaler.step. Step 2 has an inf grad: skipped whole by both. Where
    # nothing is clipped and the scale is not a power of two, torch's recipe still rounds
    # each unscaled 16-bit grad to its dtype before the step reads it (unscale_), which a
    # kernel unscaling in float would not: such grads are unscaled in place first.
    ours, ref = _pair(name, dtype, max_norm=max_norm)
    s1 = torch.amp.GradScaler("cpu", init_scale=init_scale)
    s2 = torch.amp.GradScaler("cpu", init_scale=init_scale)
    for step in range(4):
        for (params, _), scaler in ((ours, s1), (ref, s2)):
            scaler.scale(torch.ones(()))  # (the scaler makes its scale tensor here)
            _grads(params, dtype, step, scale=scaler.get_scale())
            if step == 2:
                params["vec17"].grad[5] = float("inf")
        s1.step(ours[1])
        s1.update()
        s2.unscale_(ref[1])
        norm = fused_optim.clip_grad_norm_(ref[0].values(), max_norm)
        s2.step(ref[1])
        s2.update()
        assert torch.equal(ours[1].last_grad_norm, norm)
        assert s1.get_scale() == s2.get_scale()
        if step != 2:  # (the skipped step: unscale_ wrote the ref's grads, ours are as scaled)
            _assert_grads_equal(ours[0], ref[0])
        (pa, oa), (pb, ob) = ours, ref
        for n in pa:
            assert torch.equal(pa[n].detach(), pb[n].detach()), f"step {step} param {n}"
            for k, v in oa.state.get(pa[n], {}).items():
                assert torch.equal(v, ob.state[pb[n]][k]), f"step {step} state {n}.{k}"


_HANDOFFS = [("Adam", dict(max_grad_norm=1e30)), ("Adam", dict(fused=True)),
             ("Adam", dict(max_grad_norm=1e30, kahan_summation=True)),
             ("Adam", dict(fused=True, state_dtype=torch.uint8)),
             ("Adamax", dict(max_grad_norm=1e30)), ("NAdam", dict(max_grad_norm=1e30)),
             ("Rprop", dict(max_grad_norm=1e30)), ("SGD", dict(fused=True, momentum=0.9)),
             ("Adagrad", dict(fused=True)), ("RMSprop", dict(max_grad_norm=1e30))]


@pytest.mark.parametrize("scale", [2.0 ** 16, 3000.0], ids=["2^16", "3000"])
@pytest.mark.parametrize("name,handoff", _HANDOFFS,
                         ids=[f"{n}-{','.join(k)}" for n, k in _HANDOFFS])
def test_a_16_bit_grad_unscaled_by_the_kernel_is_the_grad_unscale_leaves(name, handoff, scale):
    """GradScaler.unscale_ stores each unscaled bfloat16 grad, rounded, and the step reads
    that. A kernel handed the scale (fused=True; max_grad_norm= where nothing is clipped)
    took the float product, which differs where it is not a bfloat16 value: a bfloat16
    subnormal under a power-of-two scale (Adam's, Adamax's and NAdam's moments and Rprop's
    params differed: found by a differential fuzz, 2026-12-07), and almost every grad under
    another scale (fused=True; max_grad_norm= unscales those in place first). Note [the
    unscaled grad as stored] in csrc/cpu/multi_tensor.h. Grads whose unscaled values lie
    around 2^-126 (bfloat16's subnormals and smallest normals, zeros, both signs), 4,100 of
    them (vector loops and a scalar tail), three steps; the reference is the same optimizer
    stepped after scaler.unscale_: every bit of the params, the grads and the state."""
    g = torch.Generator().manual_seed(0)
    grads = [(torch.rand(4100, generator=g, dtype=torch.float64) * 2 - 1)
             * 2.0 ** (16 - 126 + torch.randint(-8, 3, (4100,), generator=g)) for _ in range(3)]
    for gr in grads:
        gr[::97] = 0.0
    kw = {k: v for k, v in handoff.items() if k not in ("max_grad_norm", "fused")}
    results = []
    for handed in (True, False):
        p = torch.nn.Parameter(torch.linspace(-1, 1, 4100, dtype=torch.bfloat16))
        opt = getattr(fused_optim, name)([p], lr=1e-3, **(handoff if handed else kw))
        scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=1000)
        seen = []
        for gr in grads:
            scaler.scale(torch.ones(()))
            p.grad = gr.to(torch.bfloat16)
            if not handed:
                scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
            seen.append(p.grad.clone())
        results.append((p.detach().clone(), seen, {k: v.clone() for k, v in opt.state[p].items()
                                                   if isinstance(v, torch.Tensor)}))
    (p1, g1, s1), (p2, g2, s2) = results
    assert torch.equal(p1.view(torch.int16), p2.view(torch.int16))
    for a, b in zip(g1, g2):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    assert set(s1) == set(s2)
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k


def test_max_grad_norm_with_a_subnormal_folded_factor_is_the_recipe():
    """max_grad_norm= folds the clip coefficient into the kernel's 1/scale: exact for a
    power-of-two scale while the product is a normal float32. A tiny max_grad_norm under a
    large scale made it subnormal, so it had lost bits, and every grad and param differed
    from torch's recipe (unscale_, clip_grad_norm_, step) by a few ulp (found by a
    differential fuzz, 2026-12-07); such a factor is not folded now."""
    g = torch.Generator().manual_seed(0)
    true_grad = torch.randn(35, generator=g)
    results = []
    for ours in (True, False):
        p = torch.nn.Parameter(torch.zeros(35))
        opt = (fused_optim.SGD([p], lr=1.0, max_grad_norm=1e-33) if ours
               else torch.optim.SGD([p], lr=1.0, foreach=False))
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
        p.grad = true_grad * scaler.scale(torch.ones(()))
        if not ours:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_([p], 1e-33)
        scaler.step(opt)
        results.append((p.grad.clone(), p.detach().clone()))
    (ga, pa), (gb, pb) = results
    assert torch.equal(ga, gb) and torch.equal(pa, pb)
    assert (pa != 0).all()  # (the step moved every param: the comparison is not of zeros)


@pytest.mark.parametrize("kw", [dict(fused=True), dict(max_grad_norm=1.0)], ids=str)
def test_a_grad_scaler_step_with_no_grads_does_nothing(kw):
    """With no grad at all, GradScaler.step hands the optimizer found_inf = sum([]), the
    int 0: torch's Adam(fused=True) steps, doing nothing; ours raised an AttributeError
    (found by a differential fuzz, 2026-12-07)."""
    for cls in (torch.optim.Adam, fused_optim.Adam):
        if cls is torch.optim.Adam and "max_grad_norm" in kw:
            continue
        p = torch.nn.Parameter(torch.ones(3))
        opt = cls([p], **kw)
        scaler = torch.amp.GradScaler("cpu")
        scaler.scale(torch.ones(()))
        scaler.step(opt)  # (update() would then raise, for torch's as for ours: no inf checks)
        assert torch.equal(p.detach(), torch.ones(3)) and not opt.state.get(p)


def test_clip_reads_the_grads_before_it_converts_norm_type():
    """Two bad arguments: torch's clip_grad_norm_ reads every .grad before float(norm_type),
    so an entry without one raises its AttributeError first; ours converted norm_type
    first (found by a differential fuzz, 2026-12-07)."""
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.ones(2)
    errors = []
    for clip in (torch.nn.utils.clip_grad_norm_, fused_optim.clip_grad_norm_):
        with pytest.raises(AttributeError) as e:
            clip([p, None], 1.0, norm_type="fro")
        errors.append(str(e.value))
    assert errors[0] == errors[1]


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("norm_type", NORM_TYPES[2:])  # (2 and inf: the tests above)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_max_grad_norm_of_every_norm_type_is_clip_then_step(dtype, norm_type, scaled):
    # grad_norm_type=p clips in the step by the kernels' p-norm, bitwise torch's recipe:
    # (unscale_), clip_grad_norm_(norm_type=p), step; without a warning (the kernels take
    # every norm type). Steps 0-2 clip, step 3 does not.
    ours, ref = _pair("AdamW", dtype, max_norm=2.0, grad_norm_type=norm_type)
    s1 = torch.amp.GradScaler("cpu", init_scale=2.0**12, enabled=scaled)
    s2 = torch.amp.GradScaler("cpu", init_scale=2.0**12, enabled=scaled)
    for step in range(4):
        for (params, _), scaler in ((ours, s1), (ref, s2)):
            scaler.scale(torch.ones(()))  # (the scaler makes its scale tensor here)
            _grads(params, dtype, step, (1.0 if step < 3 else 1e-6) * (2.0**12 if scaled else 1.0))
            params["zero_size"].grad = None  # (inf and negative p have no empty norm)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            s1.step(ours[1])
        s1.update()
        s2.unscale_(ref[1])
        norm = torch.nn.utils.clip_grad_norm_(ref[0].values(), 2.0, norm_type)
        s2.step(ref[1])
        s2.update()
        assert torch.equal(ours[1].last_grad_norm, norm), (step, ours[1].last_grad_norm, norm)
        _assert_same(ours, ref)


@pytest.mark.parametrize("layout", ["every other", "expanded row"])
@pytest.mark.parametrize("n", [34, 1000])
@pytest.mark.parametrize("max_norm", [1.0, 1e3])  # clips, and does not
def test_max_grad_norm_with_grad_scaler_and_a_strided_grad(n, max_norm, layout):
    """A grad that is not dense (every other element of a buffer) under a GradScaler: the
    norm was of a contiguous unscaled copy, which sums in another order than torch's norm
    of the grad unscaled in place, with its strides (found by a review, 2026-12-06: 2 of 34
    params differed). Bitwise torch's recipe: unscale_, clip_grad_norm_, step. ("expanded
    row": a (1, n) grad with strides (0, 2), whose stride 0 repeats no element: it was taken
    for an expanded grad, found by a review of the fix.)"""
    out = []
    for ours in (True, False):
        g = torch.Generator().manual_seed(0)
        p = torch.randn(n, generator=g)
        p = (p if layout == "every other" else p.view(1, n)).requires_grad_()
        opt = (fused_optim.SGD([p], lr=0.1, max_grad_norm=max_norm) if ours
               else torch.optim.SGD([p], lr=0.1, foreach=False))
        scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
        scaler.scale(torch.ones(()))
        grad = (torch.randn(2 * n, generator=g) * 256.0)[::2]
        p.grad = grad if layout == "every other" else grad.as_strided((1, n), (0, 2))
        assert p.grad.stride() == ((2,) if layout == "every other" else (0, 2))
        if ours:
            scaler.step(opt)
            norm = opt.last_grad_norm
        else:
            scaler.unscale_(opt)
            norm = torch.nn.utils.clip_grad_norm_([p], max_norm)
            scaler.step(opt)
        out.append((norm, p.detach().clone()))
    assert torch.equal(out[0][0], out[1][0])
    assert torch.equal(out[0][1], out[1][1])


def test_max_grad_norm_when_torch_runs_the_step():
    # differentiable=True runs torch's own step: the clipping is torch's own recipe. (Its
    # in-place update needs params that do not require grad.)
    ours, ref = _pair("Adam", torch.float32, max_norm=1.0, differentiable=True)
    for params, _ in (ours, ref):
        for p in params.values():
            p.requires_grad_(False)
    for step in range(3):
        _grads(ours[0], torch.float32, step)
        _grads(ref[0], torch.float32, step)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the one-time "runs torch's step" warning
            ours[1].step()
            norm = fused_optim.clip_grad_norm_(ref[0].values(), 1.0)
            ref[1].step()
        assert torch.equal(ours[1].last_grad_norm, norm)
        _assert_same(ours, ref)


def test_max_grad_norm_validation_and_keyword_only():
    p = [torch.zeros(3, requires_grad=True)]
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="Invalid max_grad_norm value"):
            fused_optim.AdamW(p, max_grad_norm=bad)
    with pytest.raises(TypeError):
        fused_optim.ASGD(p, 0.01, 1e-4, 0.75, 1e6, 0, None, False, False, False, 1.0)
    opt = fused_optim.SGD(p, lr=0.1)
    assert opt.max_grad_norm is None and opt.last_grad_norm is None
    # The option can be changed between steps, as a group's lr can.
    p[0].grad = torch.full((3,), 4.0)
    opt.max_grad_norm = 1.0
    opt.step()
    expected = torch.full((3,), 4.0) * torch.clamp(1.0 / (torch.linalg.vector_norm(torch.full((3,), 4.0)) + 1e-6), max=1.0)
    assert torch.equal(p[0].grad, expected)
    assert torch.equal(p[0].detach(), -0.1 * expected)
    # A value set between steps is checked as the constructor checks it, before anything
    # changes (until 2026-12-06 0 zeroed the grads, -1 flipped them, NaN made NaN params).
    before = (p[0].detach().clone(), p[0].grad.clone())
    for bad, error in ((0.0, ValueError), (-1.0, ValueError), (float("nan"), ValueError),
                       ("abc", TypeError), (True, TypeError)):
        opt.max_grad_norm = bad
        with pytest.raises(error, match="max_grad_norm"):
            opt.step()
        assert torch.equal(p[0].detach(), before[0]) and torch.equal(p[0].grad, before[1])
    opt.grad_norm_type = "abc"
    opt.max_grad_norm = 1.0
    with pytest.raises(TypeError, match="grad_norm_type must be a number"):
        opt.step()
    assert torch.equal(p[0].detach(), before[0]) and torch.equal(p[0].grad, before[1])
    opt.grad_norm_type = 2.0
    # Checkpoints are torch's: the option is not in them.
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    assert "max_grad_norm" not in sd["param_groups"][0]
    torch.optim.SGD([torch.zeros(3, requires_grad=True)], lr=0.1).load_state_dict(copy.deepcopy(sd))


def test_max_grad_norm_under_torch_compile():
    # A compiled step traces torch's own clipping (get_total_norm, clip_grads_with_norm_)
    # and the fused op: no graph break, and the same training as eager up to the rounding
    # of inductor's generated norm (a float32 reduction in another order: assert_close's
    # float32 tolerances).
    import torch._dynamo

    def make():
        g = torch.Generator().manual_seed(0)
        ps = [torch.randn(n, generator=g).requires_grad_() for n in (5, 64, 300)]
        return ps, fused_optim.AdamW(ps, lr=0.1, max_grad_norm=0.5)

    eager_ps, eager = make()
    comp_ps, comp = make()
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(comp.step)()
    assert explanation.graph_break_count == 0, [str(r.reason) for r in explanation.break_reasons]
    comp_ps, comp = make()
    step = torch.compile(comp.step)
    for k in range(3):
        for ps in (eager_ps, comp_ps):
            g = torch.Generator().manual_seed(k)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g) * 3
        eager.step()
        step()
        torch.testing.assert_close(comp.last_grad_norm, eager.last_grad_norm)
        for p, q in zip(comp_ps, eager_ps):
            torch.testing.assert_close(p, q)


@pytest.mark.parametrize("case", ["inf_grad", "nan_grad", "coefficient_underflows"])
@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_max_grad_norm_when_the_coefficient_is_zero_or_nan(name, case):
    # No scaler: an infinite norm makes the coefficient 0 (and 0 * inf NaN in the grads), a
    # NaN norm makes it NaN, and a tiny max norm can make the float32 factor 0. No factor
    # folds into the kernel there: the step multiplies the grads as torch's recipe does
    # (clip_grad_norm_, then the step), and the params come out as torch's, NaNs included.
    torch_cls, ours_cls = ALGOS[name]
    max_norm = 1e-30 if case == "coefficient_underflows" else 1.0
    results = []
    for inside in (True, False):
        torch.manual_seed(0)
        p = torch.randn(40, requires_grad=True)
        grad = torch.randn(40) * (1e19 if case == "coefficient_underflows" else 1.0)
        if case != "coefficient_underflows":
            grad[3] = float("inf") if case == "inf_grad" else float("nan")
        p.grad = grad
        if inside:
            opt = ours_cls([p], lr=0.1, max_grad_norm=max_norm)
            opt.step()
        else:
            opt = torch_cls([p], lr=0.1, foreach=False)
            torch.nn.utils.clip_grad_norm_([p], max_norm)
            opt.step()
        results.append((p.detach().clone(), p.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_zero_dim_float32_grads_beside_float64_ones_are_clipped_as_torch():
    # With a float64 grad among them the norm and the coefficient are float64; torch's
    # mul_ of a 0-dim float32 grad by that 0-dim coefficient computes in float64, then
    # rounds (a grad of any other shape is multiplied in float32).
    g = torch.Generator().manual_seed(3)

    def params():
        torch.manual_seed(1)
        a = torch.zeros((), requires_grad=True)
        b = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        c = torch.zeros(5, requires_grad=True)
        return [a, b, c]

    for trial in range(50):
        grads = [torch.randn((), generator=g), torch.randn(3, generator=g, dtype=torch.float64) * 10,
                 torch.randn(5, generator=g)]
        ours, ref = params(), params()
        for ps in (ours, ref):
            for p, gr in zip(ps, grads):
                p.grad = gr.clone()
        n1 = fused_optim.clip_grad_norm_(ours, 1.0)
        n2 = torch.nn.utils.clip_grad_norm_(ref, 1.0)
        assert torch.equal(n1, n2)
        for p, q in zip(ours, ref):
            assert torch.equal(p.grad, q.grad), trial
    # in the step: the same products, then Adagrad's update of each
    ours, ref = params(), params()
    opt1 = fused_optim.Adagrad(ours, lr=0.1, max_grad_norm=1.0)
    opt2 = fused_optim.Adagrad(ref, lr=0.1)
    for step in range(3):
        grads = [torch.randn((), generator=g), torch.randn(3, generator=g, dtype=torch.float64) * 10,
                 torch.randn(5, generator=g)]
        for ps in (ours, ref):
            for p, gr in zip(ps, grads):
                p.grad = gr.clone()
        opt1.step()
        torch.nn.utils.clip_grad_norm_(ref, 1.0)
        opt2.step()
        for p, q in zip(ours, ref):
            assert torch.equal(p, q) and torch.equal(opt1.state[p]["sum"], opt2.state[q]["sum"])


@pytest.mark.parametrize("norm_type", [float("inf"), float("-inf"), -1.0])
def test_empty_grad_norm_error_follows_foreach(norm_type):
    # The norm types with no identity (inf, -inf, negative p) raise for an empty grad, as
    # torch does, before any grad changes. foreach=False: torch takes each grad's norm
    # with linalg.vector_norm, whose error for the inf-norm of an empty tensor differs from
    # _foreach_norm's (None and True on the CPU).
    for foreach in (False, None, True):
        messages = []
        for clip in (torch.nn.utils.clip_grad_norm_, fused_optim.clip_grad_norm_):
            p = torch.zeros(0, requires_grad=True)
            p.grad = torch.zeros(0)
            q = torch.ones(3, requires_grad=True)
            q.grad = torch.full((3,), 5.0)
            with pytest.raises(RuntimeError) as info:
                clip([q, p], 1.0, norm_type=norm_type, foreach=foreach)
            assert torch.equal(q.grad, torch.full((3,), 5.0))
            messages.append(str(info.value))
        assert messages[0] == messages[1], foreach
        messages = []
        for total in (torch.nn.utils.get_total_norm, fused_optim.get_total_norm):
            with pytest.raises(RuntimeError) as info:
                total([torch.zeros(0), torch.ones(2)], norm_type, foreach=foreach)
            messages.append(str(info.value))
        assert messages[0] == messages[1], foreach
    # nn.Parameters (a list of params, not grads): torch's foreach=None takes each one's
    # linalg.vector_norm, and its error (found by a review, 2026-12-07).
    messages = []
    for total in (torch.nn.utils.get_total_norm, fused_optim.get_total_norm):
        with pytest.raises(RuntimeError) as info:
            total([torch.nn.Parameter(torch.zeros(0)), torch.nn.Parameter(torch.ones(2))],
                  norm_type)
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    # Norm types with an identity: an empty grad's norm is 0, as torch's.
    for ok in (0.0, 1.0, 0.5, 2.0, 3.0):
        grads = [torch.zeros(0), torch.full((2,), 3.0)]
        assert torch.equal(fused_optim.get_total_norm(grads, ok),
                           torch.nn.utils.get_total_norm(grads, ok)), ok


def test_a_clipping_fallback_warning_is_never_silent():
    """Found by a review (2026-12-06): the one-time warning that torch's implementation runs
    was keyed by its reason alone and recorded before it was given. So in-step clipping's
    warning silenced clip_grad_norm_'s and get_total_norm's for the same reason, and with
    warnings as errors the first call raised and every later one ran torch's code
    silently. Now keyed by the function and the reason, and recorded once given. (The
    reason here: complex grads, which the norm kernels do not take.)"""
    fclip._warned.clear()
    c = torch.complex64
    p = torch.nn.Parameter(torch.randn(20, dtype=c))
    for _ in range(2):  # raised each time: never a silent fallback
        p.grad = torch.randn(20, dtype=c)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(UserWarning, match="torch.complex64 grads"):
                fused_optim.get_total_norm([p.grad], norm_type=3.0)
    p.grad = torch.randn(20, dtype=c)
    with pytest.warns(UserWarning, match=r"^fused_optim.SGD\(max_grad_norm=\.\.\.\): the fused "
                      r"kernels do not support torch.complex64 grads.*running torch.nn.utils."
                      r"get_total_norm and clip_grads_with_norm_'s implementation instead"):
        fused_optim.SGD([p], lr=0.1, max_grad_norm=0.5, grad_norm_type=1.0).step()
    # each function warns of its own use for the same reason (in-step clipping's warning
    # silenced these)
    with pytest.warns(UserWarning, match=r"^fused_optim.clip_grad_norm_: the fused kernels do not "
                      r"support torch.complex64 grads"):
        fused_optim.clip_grad_norm_([p], 0.5, norm_type=1.0)
    with pytest.warns(UserWarning, match=r"^fused_optim.get_total_norm: the fused kernels do not "
                      r"support torch.complex64 grads"):
        fused_optim.get_total_norm([p.grad], norm_type=1.0)


@pytest.mark.parametrize("max_norm", [1.0, 1e9])  # (clipping, and a coefficient of 1)
@pytest.mark.parametrize("scale", [None, 1024.0, 1000.0])
def test_clipping_holds_where_grads_of_another_dtype_run_torchs_step(scale, max_norm):
    """Found by a review (2026-12-06): float32 grads of bfloat16 params (torch's
    p.grad_dtype = torch.float32) run torch's own step, and in-step clipping had folded its
    coefficient into a scale that only a GradScaler's step applied, and only the first
    group's: without a scaler the step went unclipped, with one a second group's grads
    stayed scaled (or were unscaled twice). Now each group's scale is applied: bitwise
    torch's recipe, GradScaler.unscale_, clip_grad_norm_, step."""
    if not hasattr(torch.Tensor, "grad_dtype"):
        pytest.skip("torch without Tensor.grad_dtype")

    def make():
        g = torch.Generator().manual_seed(0)
        a = torch.nn.Parameter(torch.randn(64, generator=g).bfloat16())
        b = torch.nn.Parameter(torch.randn(48, generator=g).bfloat16())
        a.grad_dtype = torch.float32  # (float32 grads for a bfloat16 param)
        return a, b

    def grads(step):
        g = torch.Generator().manual_seed(10 + step)
        s = 1.0 if scale is None else scale
        return (torch.randn(64, generator=g) * 50 * s,
                (torch.randn(48, generator=g) * 50 * s).bfloat16())

    # ours: the float32-grad param in the second group too (a group order that unscaled
    # twice), and in the first
    for order in ((0, 1), (1, 0)):
        a, b = make()
        ra, rb = make()
        ps, rps = [(a, b)[i] for i in order], [(ra, rb)[i] for i in order]
        ours = fused_optim.SGD([{"params": [ps[0]]}, {"params": [ps[1]]}], lr=0.1,
                               momentum=0.9, max_grad_norm=max_norm)
        ref = torch.optim.SGD([{"params": [rps[0]]}, {"params": [rps[1]]}], lr=0.1,
                              momentum=0.9, foreach=False)
        for step in range(3):
            ga, gb = grads(step)
            a.grad, b.grad, ra.grad, rb.grad = ga.clone(), gb.clone(), ga.clone(), gb.clone()
            if scale is None:
                ours.step()
            else:  # (as GradScaler.step hands a scale to an optimizer that takes one)
                ours.grad_scale = torch.tensor(scale)
                ours.found_inf = torch.tensor(0.0)
                try:
                    ours.step()
                finally:
                    ours.grad_scale = ours.found_inf = None
                inv = torch.tensor(scale).double().reciprocal().float()
                for g_ in (ra.grad, rb.grad):
                    g_.mul_(inv)  # (GradScaler.unscale_'s product)
            norm = torch.nn.utils.clip_grad_norm_([rps[0], rps[1]], max_norm)
            ref.step()
            assert torch.equal(ours.last_grad_norm, norm)
            for p, q in ((a, ra), (b, rb)):
                assert torch.equal(p.grad, q.grad), (order, step)
                assert torch.equal(p.detach(), q.detach()), (order, step)


@pytest.mark.parametrize("how", ["one param twice", "two params, one grad tensor",
                                 "overlapping views", "a non-dense view beside its base"])
@pytest.mark.parametrize("fn", ["clip_grad_norm_", "clip_grads_with_norm_"])
def test_grads_sharing_memory_are_scaled_once_per_entry_in_list_order(how, fn):
    # torch multiplies each entry of the list in turn, so a shared element is scaled once per
    # entry that holds it. In one parallel region two threads raced on such elements: an
    # element came out scaled once or twice, run to run (found by a review, 2026-12-06).
    # Elements past 2 * kGrainSize so that the multiply is split across threads.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for trial in range(3):
            results = []
            for mod in (torch.nn.utils, fused_optim):
                torch.manual_seed(trial)
                base = torch.randn(70_000)
                p = torch.zeros(70_000, requires_grad=True)
                if how == "one param twice":
                    p.grad = base.clone()
                    params, grads = [p, p], [p.grad]
                elif how == "two params, one grad tensor":
                    q = torch.zeros(70_000, requires_grad=True)
                    p.grad = base.clone()
                    q.grad = p.grad
                    params, grads = [p, q], [p.grad]
                elif how == "overlapping views":
                    buffer = base.clone()
                    q = torch.zeros(50_000, requires_grad=True)
                    p = torch.zeros(50_000, requires_grad=True)
                    p.grad, q.grad = buffer[:50_000], buffer[20_000:]
                    params, grads = [p, q], [buffer]
                else:
                    buffer = base.clone().view(350, 200)
                    q = torch.zeros(200, 350, requires_grad=True)
                    p = torch.zeros(350, 200, requires_grad=True)
                    p.grad, q.grad = buffer, buffer.t()[:, :]
                    params, grads = [p, q], [buffer]
                if fn == "clip_grad_norm_":
                    norm = getattr(mod, fn)(params, 0.5)
                else:
                    norm = torch.tensor(1234.5)
                    getattr(mod, fn)(params, 0.5, norm)
                results.append((norm, [g.clone() for g in grads]))
            (ref_norm, ref), (norm, ours) = results
            assert torch.equal(norm, ref_norm)
            for a, b in zip(ours, ref):
                assert torch.equal(a, b), (how, trial)  # bitwise: the same products, in order
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("max_norm", [0.5, 1e6])  # clipping or not (a product by exactly 1)
def test_an_expanded_grad_is_refused_as_torchs_multiply_refuses_it(max_norm):
    msg = "more than one element of the written-to tensor refers to a single memory location"
    for fn in (torch.nn.utils.clip_grad_norm_, fused_optim.clip_grad_norm_):
        p = torch.zeros(4, 3, requires_grad=True)
        q = torch.zeros(5, requires_grad=True)
        q.grad = torch.full((5,), 2.0)
        p.grad = torch.randn(3).expand(4, 3)
        with pytest.raises(RuntimeError, match=msg):
            fn([q, p], max_norm)
        if fn is fused_optim.clip_grad_norm_:
            # before anything is written (torch has scaled q's grad by then)
            assert torch.equal(q.grad, torch.full((5,), 2.0))


def test_a_bad_max_norm_raises_torchs_error_even_without_grads():
    for fn in (torch.nn.utils.clip_grad_norm_, fused_optim.clip_grad_norm_):
        p = torch.zeros(3, requires_grad=True)
        with pytest.raises(ValueError, match="could not convert string to float: 'abc'"):
            fn([p], "abc")
