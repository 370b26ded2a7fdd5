"""fused_optim.Muon against torch.optim.Muon's for-loop: every option, dtype and layout,
every element of every param and state; checkpoints, GradScaler, threads, errors.

Note [Muon's tolerance]
torch's Newton-Schulz iterations run in bfloat16 (8 significant bits), whatever the
param's dtype, and ours are the same ATen calls on a stack of all params of one shape
(bmm/baddbmm instead of mm/addmm; Note [Muon as torch computes it] in csrc/cpu/muon.cpp),
around elementwise passes that round as torch's kernels do. Where BLAS computes each
matrix of a batch as it computes a single matrix, the step is bitwise torch's
(test_bitwise_where_blas_batches_like_torch checks it; it holds with oneDNN's bfloat16
kernels on AVX512-BF16, torch 2.13, at 1 to 16 threads). Where BLAS blocks a batch
otherwise, a float32 sum comes out in another order, and a bfloat16 product may round the
other way. The iterations are sensitive to that: one ulp more in one element of the input,
or its scale changed by 2**-8, moves elements of torch's own update by up to 0.042
(measured on the shapes here and on 128x128 and 96x256, 20 inputs each; the update's
entries are at most about 0.6). The momentum buffers depend only on the grads and stay
bitwise equal, and params do not feed back into the grads here, so each step moves a
param by at most lr_adjusted * 2**-4 more than torch's, and the differences add up over
the steps: params within steps * lr_adjusted * 2**-4, plus, for 16-bit params, one ulp of
the param's dtype per step (a perturbed update can round the param the other way; and
Note [torch's bfloat16 add] in muon.cpp). The same bound holds for fused_optim::_muon_aten_
(the CUDA code run on the CPU), whose per-matrix norms add in another order than torch's.
"""
import copy
import inspect
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import fused_optim

pytestmark = pytest.mark.skipif(not hasattr(torch.optim, "Muon"),
                                reason="torch.optim.Muon needs torch 2.9 or later")

# Several params of one shape (one batch), tall, wide, square, a row and a column.
SHAPES = [(24, 24), (24, 24), (24, 24), (12, 40), (12, 40), (40, 12), (40, 12), (9, 5),
          (1, 6), (6, 1), (70, 70)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
TENSOR_LR = "tensor"
OPTIONS = [
    dict(),
    dict(nesterov=False),
    dict(adjust_lr_fn="original"),
    dict(adjust_lr_fn="match_rms_adamw"),
    dict(adjust_lr_fn="match_rms_adamw", nesterov=False),
    dict(weight_decay=0.0),
    dict(weight_decay=0.3, lr=0.05),
    dict(momentum=0.0),
    dict(momentum=0.6, nesterov=False),
    dict(ns_steps=0),
    dict(ns_steps=1),
    dict(ns_steps=7),
    dict(eps=1e-3),
    dict(ns_coefficients=(2.0, -1.5, 0.5)),
    dict(lr=TENSOR_LR),
    dict(lr=TENSOR_LR, adjust_lr_fn="match_rms_adamw", weight_decay=0.2),
]


def _opts(options):
    o = dict(lr=0.02)
    o.update(options)
    if o["lr"] == TENSOR_LR:
        o["lr"] = torch.tensor(0.02)
    return o


def make_params(dtype, layout="contiguous", shapes=SHAPES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ps = []
    for r, c in shapes:
        if layout == "transposed":  # a dense param with column-major strides
            t = torch.randn(c, r, generator=gen).t()
        elif layout == "strided":  # not dense: every other column of a wider tensor
            t = torch.randn(r, 2 * c, generator=gen)[:, ::2]
        else:
            t = torch.randn(r, c, generator=gen)
        ps.append(t.to(dtype).requires_grad_())
    return ps


def clone_params(ps):
    """Copies with the same strides (also where they are not dense)."""
    out = []
    for p in ps:
        q = torch.empty_strided(p.size(), p.stride(), dtype=p.dtype)
        out.append(q.copy_(p.detach()).requires_grad_())
    return out


def set_grads(params_lists, step, scale=1.0, layout="contiguous"):
    gen = torch.Generator().manual_seed(1000 + step)
    for i, p in enumerate(params_lists[0]):
        g = torch.randn(p.shape, generator=gen) * scale
        if layout == "transposed":
            g = g.t().contiguous().t()
        for ps in params_lists:
            ps[i].grad = g.to(ps[i].dtype).clone(memory_format=torch.preserve_format)


def adjusted_lr(opt_kwargs, shape):
    lr = float(opt_kwargs.get("lr", 1e-3))
    a, b = shape
    fn = opt_kwargs.get("adjust_lr_fn")
    ratio = math.sqrt(max(1, a / b)) if fn in (None, "original") else 0.2 * math.sqrt(max(a, b))
    return lr * ratio


def assert_matches(ours, ref, opt_ours, opt_ref, kwargs, steps):
    """Every element of every param (Note [Muon's tolerance]) and of every buffer (exact)."""
    for i, (p, q) in enumerate(zip(ours, ref)):
        rtol = 0.0 if p.dtype in (torch.float32, torch.float64) else steps * torch.finfo(p.dtype).eps
        atol = steps * adjusted_lr(kwargs, p.shape) * 2**-4
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=lambda m: f"param {i}: {m}")
        assert p.stride() == q.stride()
        s, t = opt_ours.state.get(p, {}), opt_ref.state.get(q, {})
        assert s.keys() == t.keys()
        for key in t:
            torch.testing.assert_close(s[key], t[key], rtol=0, atol=0,
                                       msg=lambda m: f"param {i} {key}: {m}")
            assert s[key].stride() == t[key].stride() and s[key].dtype == t[key].dtype


def run_both(dtype, options, steps=3, layout="contiguous", shapes=SHAPES):
    kwargs = _opts(options)
    ref = make_params(dtype, layout, shapes)
    ours = clone_params(ref)
    opt_ref = torch.optim.Muon(ref, **kwargs)
    opt_ours = fused_optim.Muon(ours, **kwargs)
    for step in range(steps):
        set_grads([ref, ours], step, layout=layout)
        opt_ref.step()
        opt_ours.step()
        assert_matches(ours, ref, opt_ours, opt_ref, kwargs, step + 1)
    return ours, ref, opt_ours, opt_ref


@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_torch_for_loop(options, dtype):
    run_both(dtype, options)


@pytest.mark.parametrize("layout", ["transposed", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_params(layout, dtype):
    run_both(dtype, dict(), layout=layout)
    run_both(dtype, dict(nesterov=False, weight_decay=0.2), layout=layout)


def test_many_steps():
    run_both(torch.float32, dict(lr=0.01), steps=25)


def test_bigger_matrices_and_batches():
    # Sizes where BLAS blocks (and threads) the products, several of each shape.
    shapes = [(96, 256)] * 2 + [(256, 96)] * 2 + [(128, 128)] * 3 + [(300, 7)]
    run_both(torch.float32, dict(), steps=2, shapes=shapes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_empty_and_one_element_params(dtype):
    # (A param with no columns makes torch's _adjust_lr divide by zero: not mirrored.)
    run_both(dtype, dict(), shapes=[(0, 5), (1, 1), (1, 1), (3, 4)])


def _blas_batches_like_torch(shapes):
    """True when bmm/baddbmm on a stack give each matrix the bits of mm/addmm alone."""
    gen = torch.Generator().manual_seed(5)
    for r, c in set(shapes):
        r, c = min(r, c), max(r, c)
        x = torch.randn(3, r, c, generator=gen).bfloat16()
        gram = torch.bmm(x, x.transpose(1, 2))
        upd = torch.baddbmm(gram, gram, gram, beta=-4.775, alpha=2.0315)
        out = torch.baddbmm(x, upd, x, beta=3.4445)
        for i in range(3):
            g = x[i] @ x[i].T
            u = torch.addmm(g, g, g, beta=-4.775, alpha=2.0315)
            if not (torch.equal(g, gram[i]) and torch.equal(u, upd[i])
                    and torch.equal(torch.addmm(x[i], u, x[i], beta=3.4445), out[i])):
                return False
    return True


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", [dict(), dict(nesterov=False, lr=TENSOR_LR)], ids=str)
def test_bitwise_where_blas_batches_like_torch(dtype, options):
    if not _blas_batches_like_torch(SHAPES):
        pytest.skip("this BLAS computes a batched product with other bits than single ones")
    kwargs = _opts(options)
    ref = make_params(dtype)
    ours = clone_params(ref)
    opt_ref, opt_ours = torch.optim.Muon(ref, **kwargs), fused_optim.Muon(ours, **kwargs)
    for step in range(4):
        set_grads([ref, ours], step)
        opt_ref.step()
        opt_ours.step()
    for p, q in zip(ours, ref):
        assert torch.equal(p, q)
        assert torch.equal(opt_ours.state[p]["momentum_buffer"], opt_ref.state[q]["momentum_buffer"])


def assert_bitwise_torchs(dtype, kwargs, shapes, steps=3, layout="contiguous", threads=None):
    """`steps` steps of ours and torch.optim.Muon's on params of `shapes` (and `layout`), at
    `threads` threads (by default the current count, one for 16-bit params): every param
    and buffer bitwise equal."""
    ref = make_params(dtype, layout, shapes)
    ours = clone_params(ref)
    opt_ref, opt_ours = torch.optim.Muon(ref, **kwargs), fused_optim.Muon(ours, **kwargs)
    before = torch.get_num_threads()
    if threads is None:
        # torch's 16-bit add splits a param of 32,768 elements or more into one run per
        # thread, each with its own scalar tail (Note [torch's bfloat16 add]): one thread,
        # one run.
        threads = 1 if dtype in (torch.bfloat16, torch.float16) else before
    torch.set_num_threads(threads)
    try:
        for step in range(steps):
            set_grads([ref, ours], step, layout=layout)
            opt_ref.step()
            opt_ours.step()
    finally:
        torch.set_num_threads(before)
    for p, q in zip(ours, ref):
        assert torch.equal(p, q)
        assert torch.equal(opt_ours.state[p]["momentum_buffer"], opt_ref.state[q]["momentum_buffer"])


# Each shape once, a tall one above 32,768 elements among them.
LONE_SHAPES = [(24, 24), (12, 40), (40, 12), (9, 5), (1, 6), (6, 1), (70, 70), (130, 66),
               (1024, 768)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", [dict(), dict(nesterov=False, lr=TENSOR_LR, weight_decay=0.1),
                                     dict(adjust_lr_fn="match_rms_adamw")], ids=str)
def test_bitwise_for_params_alone_in_their_shape(dtype, options):
    """A param with no other of its shape in the group takes the 2-D products, torch's own
    calls (newton_schulz in muon.cpp): its step is torch's bit for bit on any BLAS, also
    where batched products round otherwise (the test above then skips)."""
    assert_bitwise_torchs(dtype, _opts(options), LONE_SHAPES)


@pytest.mark.parametrize("layout", ["transposed", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bitwise_for_non_contiguous_params_alone_in_their_shape(dtype, layout):
    """A param alone in its group and not row-major: torch's bfloat16 add_ takes its scalar
    loop (two roundings) where the update's strides are not the param's, and the loops of
    the CPU kernel, on the param's contiguous copy, had fused them (Note [torch's bfloat16
    add]); such a param is now stepped by ATen's mul_ and add_ on the param itself, with
    the update in torch's layout. A transposed one's bits were torch's only beside a param
    of another dtype, whose group took ATen's ops already (found by an invariance fuzz,
    2026-12-07; every other column was torch's before too)."""
    for shape in LONE_SHAPES[:-1]:  # (one param a group, the path a lone param takes)
        assert_bitwise_torchs(dtype, {}, [shape], layout=layout)
    assert_bitwise_torchs(dtype, dict(nesterov=False, weight_decay=0.1), LONE_SHAPES[:3],
                          layout=layout)


@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_non_contiguous_bfloat16_params_in_small_groups_side_by_side(layout):
    """Such params in several small shape groups, which run side by side on two threads
    (Note [Muon's small groups]): their ATen calls are made on the calling thread, and the
    bits are torch's (params of under 32,768 elements: torch's own bits do not depend on
    its thread count there)."""
    # (each shape once: no batched products)
    assert_bitwise_torchs(torch.bfloat16, {}, LONE_SHAPES[:-1], layout=layout, threads=2)


# Several params of each shape, at and above the size from which a group's matrices take
# the 2-D products one by one (kMatrixByMatrix, Note [Muon's products] in muon.cpp), wide
# and tall, with smaller ones that stay batched and run side by side on the threads (Note
# [Muon's small groups]).
BIG_SHAPES = [(256, 512), (512, 256), (256, 512), (512, 256), (512, 1024), (512, 1024),
              (24, 24), (24, 24), (12, 40), (12, 40), (40, 12)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("options", [dict(weight_decay=0.1), dict(nesterov=False),
                                     dict(ns_steps=0, weight_decay=0.1)], ids=str)
def test_bitwise_for_big_matrices_of_one_shape(dtype, options):
    """A group's matrices of 2**17 elements or more take torch's own 2-D calls one by one
    (2**19 or more: with every thread), bitwise torch's on any BLAS whose bits do not follow
    the thread count; the small ones beside them as the tests above."""
    if not _blas_batches_like_torch([s for s in BIG_SHAPES if s[0] * s[1] < 2**17]):
        pytest.skip("this BLAS computes a batched product with other bits than single ones")
    assert_bitwise_torchs(dtype, _opts(options), BIG_SHAPES)


CALLER_STATE_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import torch, fused_optim
import test_muon as tm
torch.set_num_threads(2)
ref = tm.make_params(torch.float32, "strided")
ours = tm.clone_params(ref)
kwargs = dict(lr=0.02)
opt_ref = torch.optim.Muon(ref, **kwargs)
opt_ours = fused_optim.Muon(ours, **kwargs)
with torch.autocast("cpu", dtype=torch.bfloat16), \\
        torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
    for step in range(3):
        tm.set_grads([ref, ours], step)
        opt_ref.step()
        opt_ours.step()
if tm._blas_batches_like_torch(tm.SHAPES):
    for p, q in zip(ours, ref):
        assert torch.equal(p, q)
        assert torch.equal(opt_ours.state[p]["momentum_buffer"], opt_ref.state[q]["momentum_buffer"])
else:  # (Note [Muon's tolerance])
    tm.assert_matches(ours, ref, opt_ours, opt_ref, kwargs, 3)
print("ok")
"""


def test_small_groups_on_threads_see_the_callers_state():
    """Note [Muon's small groups]: the groups that run side by side on the threads see the
    caller's autocast (bitwise torch's here: bfloat16 autocast leaves bfloat16 products
    alone), and a step inside saved-tensor hooks (Python objects in thread-local state) with
    strided params (copied back on the calling thread) neither hangs nor differs. In a
    subprocess with a timeout: a worker that waits for the GIL hangs the process."""
    out = subprocess.run([sys.executable, "-c",
                          CALLER_STATE_SCRIPT.format(tests=os.path.dirname(__file__))],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


PYTHON_KERNEL_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import torch, fused_optim
calls = [0]
lib = torch.library.Library("aten", "IMPL")

def addmm(inp, a, b, *, beta=1, alpha=1):  # (the same product, through another op)
    calls[0] += 1
    return torch.baddbmm(inp.unsqueeze(0), a.unsqueeze(0), b.unsqueeze(0), beta=beta,
                         alpha=alpha).squeeze(0)

lib.impl("addmm", addmm, "CPU")
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
ref = [torch.nn.Parameter(torch.randn(20 + i, 30 + i, generator=g)) for i in range(12)]
ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]
opts = [torch.optim.Muon(ref, lr=1e-2), fused_optim.Muon(ours, lr=1e-2)]
for step in range(3):
    for p, q in zip(ref, ours):
        p.grad = torch.randn(p.shape, generator=g)
        q.grad = p.grad.clone()
    for o in opts:
        o.step()
assert calls[0] > 0
for p, q in zip(ref, ours):
    torch.testing.assert_close(q, p)  # (Note [Muon's tolerance]; the point is the hang)
print("ok")
"""


def test_a_python_kernel_of_an_op_that_muon_runs_does_not_hang_its_step():
    """Muon runs small shape groups' ATen ops on torch's worker threads; an op registered
    as a Python kernel (torch.library) waits there for the GIL, which a step under 2**20
    elements held on the calling thread, waiting for the workers: the second step hung for
    good (found by a review, 2026-12-06). Muon's calls now release the GIL (Note [the GIL
    during a step] in csrc/python_step.cpp). In a subprocess with a timeout."""
    out = subprocess.run([sys.executable, "-c",
                          PYTHON_KERNEL_SCRIPT.format(tests=os.path.dirname(__file__))],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


ISA_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import torch, fused_optim
import test_muon as tm
out = {{"isa": torch.ops.fused_optim._cpu_isa()}}
for dtype in tm.DTYPES:
    ps = tm.make_params(dtype)
    opt = fused_optim.Muon(ps, lr=0.02, nesterov=dtype != torch.bfloat16)
    for step in range(2):
        tm.set_grads([ps], step)
        opt.step()
    out[str(dtype)] = [t for p in ps for t in (p.detach(), opt.state[p]["momentum_buffer"])]
torch.save(out, sys.argv[1])
"""


def test_same_bits_with_every_isa(tmp_path):
    # The elementwise passes' baseline, AVX2 and AVX-512 copies (Note [ISA dispatch]).
    results = {}
    for isa in ("baseline", "avx2", "avx512"):
        out = tmp_path / f"{isa}.pt"
        # (each copy of the float32 loops: Note [float loops in AVX2])
        env = dict(os.environ, FUSED_OPTIM_ISA=isa, FUSED_OPTIM_FLOAT_LOOPS="avx512")
        subprocess.run([sys.executable, "-c", ISA_SCRIPT.format(tests=os.path.dirname(__file__)),
                        str(out)], env=env, check=True, timeout=300)
        results[isa] = torch.load(out)
        results[isa].pop("isa")
    for isa in ("avx2", "avx512"):
        for key, tensors in results["baseline"].items():
            for a, b in zip(tensors, results[isa][key]):
                assert torch.equal(a, b), f"{key}: {isa} differs from baseline"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_same_bits_at_any_thread_count(dtype):
    shapes = SHAPES + [(96, 256)] * 2 + [(256, 96)]
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            ps = make_params(dtype, shapes=shapes)
            opt = fused_optim.Muon([{"params": ps[:5]}, {"params": ps[5:], "nesterov": False}],
                                   lr=0.02)
            for step in range(3):
                set_grads([ps], step)
                opt.step()
            results.append([t.clone() for p in ps for t in (p, opt.state[p]["momentum_buffer"])])
    finally:
        torch.set_num_threads(old)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_params_without_grad_and_several_groups():
    kwargs = _opts({})
    ref = make_params(torch.float32)
    ours = clone_params(ref)
    groups = lambda ps: [{"params": ps[:4]}, {"params": ps[4:], "lr": 0.05, "nesterov": False}]  # noqa: E731
    opt_ref, opt_ours = torch.optim.Muon(groups(ref), **kwargs), fused_optim.Muon(groups(ours), **kwargs)
    for step in range(3):
        set_grads([ref, ours], step)
        ref[2].grad = ours[2].grad = None
        opt_ref.step()
        opt_ours.step()
    assert 2 not in [i for i, p in enumerate(ours) if p in opt_ours.state]
    assert_matches(ours, ref, opt_ours, opt_ref, dict(kwargs, lr=0.05), 3)


def test_integer_like_ns_steps_count_as_torchs_range_counts_them():
    # torch's step runs range(ns_steps), which takes anything with __index__ (a numpy
    # integer, a 0-dim integer tensor): the same iterations as the int, bit for bit, and
    # torch's result within the suite's tolerance.
    import numpy as np
    runs = []
    for ns_steps in (3, np.int64(3), torch.tensor(3)):
        ps = make_params(torch.float32, shapes=[(4, 6), (5, 3)])
        opt = fused_optim.Muon(ps, ns_steps=ns_steps, **_opts({}))
        for step in range(2):
            set_grads([ps], step)
            opt.step()
        runs.append((ps, opt))
    ref = make_params(torch.float32, shapes=[(4, 6), (5, 3)])
    opt_ref = torch.optim.Muon(ref, ns_steps=np.int64(3), **_opts({}))
    for step in range(2):
        set_grads([ref], step)
        opt_ref.step()
    for ps, _ in runs:
        assert all(torch.equal(p, q) for p, q in zip(ps, runs[0][0]))
    assert_matches(runs[0][0], ref, runs[0][1], opt_ref, _opts({}), 2)


@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
def test_checkpoints_both_ways(direction):
    kwargs = _opts({})
    a = make_params(torch.float32)
    b = clone_params(a)
    first_cls, second_cls = ((torch.optim.Muon, fused_optim.Muon) if direction == "torch_to_ours"
                             else (fused_optim.Muon, torch.optim.Muon))
    first = first_cls(a, **kwargs)
    for step in range(2):
        set_grads([a], step)
        first.step()
    state = copy.deepcopy(first.state_dict())  # as through torch.save: no shared tensors
    # The same trajectory continued by the other class from the checkpoint, and by the
    # first one.
    with torch.no_grad():
        for p, q in zip(b, a):
            p.copy_(q)
    second = second_cls(b, **kwargs)
    second.load_state_dict(state)
    sd2 = second.state_dict()
    assert sd2["param_groups"] == state["param_groups"]
    for k, v in state["state"].items():
        assert torch.equal(sd2["state"][k]["momentum_buffer"], v["momentum_buffer"])
    for step in range(2, 4):
        set_grads([a, b], step)
        first.step()
        second.step()
    ours, ref = (b, a) if direction == "torch_to_ours" else (a, b)
    opt_ours, opt_ref = (second, first) if direction == "torch_to_ours" else (first, second)
    assert_matches(ours, ref, opt_ours, opt_ref, kwargs, 4)


def _scaled_step(params, opt, scaler, step, inf=False):
    gen = torch.Generator().manual_seed(2000 + step)
    opt.zero_grad()
    loss = sum((p.float() * torch.randn(p.shape, generator=gen)).sum() for p in params)
    scaler.scale(loss).backward()
    if inf:
        params[1].grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()


@pytest.mark.parametrize("handoff", [False, True])
def test_grad_scaler_matches_torch_and_skips_inf_steps(handoff):
    """As torch's for-loop; with the handoff (Note [GradScaler's handoff]) the kernel
    unscales the grads and skips the inf step."""
    kwargs = _opts({})
    ref = make_params(torch.float32)
    ours = clone_params(ref)
    opt_ref, opt_ours = torch.optim.Muon(ref, **kwargs), fused_optim.Muon(ours, **kwargs)
    opt_ours._step_supports_amp_scaling = handoff
    sc_ref = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    sc_ours = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for step in range(3):
        _scaled_step(ref, opt_ref, sc_ref, step)
        _scaled_step(ours, opt_ours, sc_ours, step)
    assert_matches(ours, ref, opt_ours, opt_ref, kwargs, 3)
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)  # unscaled, as torch leaves them
    before = [t.clone() for p in ours for t in (p, opt_ours.state[p]["momentum_buffer"])]
    _scaled_step(ours, opt_ours, sc_ours, 3, inf=True)
    after = [t for p in ours for t in (p, opt_ours.state[p]["momentum_buffer"])]
    for x, y in zip(before, after):
        assert torch.equal(x, y)
    assert sc_ours.get_scale() == 2.0**11


def test_max_grad_norm_clips_like_clip_grad_norm():
    kwargs = _opts({})
    ref = make_params(torch.float32)
    ours = clone_params(ref)
    opt_ref = torch.optim.Muon(ref, **kwargs)
    opt_ours = fused_optim.Muon(ours, **kwargs, max_grad_norm=0.5)
    for step in range(3):
        set_grads([ref, ours], step)
        torch.nn.utils.clip_grad_norm_(ref, 0.5)
        opt_ref.step()
        opt_ours.step()
    assert_matches(ours, ref, opt_ours, opt_ref, kwargs, 3)


def test_signature_defaults_and_namespace():
    ours = inspect.signature(fused_optim.Muon.__init__).parameters
    ref = inspect.signature(torch.optim.Muon.__init__).parameters
    assert list(ours)[:len(ref)] == list(ref)
    assert list(ours)[len(ref):] == ["max_grad_norm", "grad_norm_type"]
    for key, p in ref.items():
        assert ours[key].kind == p.kind and ours[key].default == p.default, key
    for key in ("max_grad_norm", "grad_norm_type"):
        assert ours[key].kind == inspect.Parameter.KEYWORD_ONLY
    ps = make_params(torch.float32)
    assert fused_optim.Muon(ps).defaults == torch.optim.Muon(ps).defaults
    assert issubclass(fused_optim.Muon, torch.optim.Muon)
    assert "Muon" in fused_optim.FUSED and "Muon" not in fused_optim.TORCH_OWN
    assert repr(fused_optim.Muon(ps)) == repr(torch.optim.Muon(ps))


CONSTRUCTOR_ERRORS = [
    (dict(lr=-1.0), ValueError, "Learning rate should be >= 0 but is: -1.0"),
    (dict(momentum=-0.5), ValueError, "momentum should be >= 0 but is: -0.5"),
    (dict(weight_decay=-0.1), ValueError, "weight decay should be >= 0 but is: -0.1"),
    (dict(adjust_lr_fn="sqrt"), ValueError, "Adjust learning rate function sqrt is not supported"),
    (dict(lr=torch.tensor([0.1, 0.2])), ValueError, "Tensor lr must be 1-element"),
]


@pytest.mark.parametrize("kwargs,exc,message", CONSTRUCTOR_ERRORS, ids=str)
def test_constructor_errors_are_torchs(kwargs, exc, message):
    for cls in (torch.optim.Muon, fused_optim.Muon):
        with pytest.raises(exc, match=re.escape(message)):
            cls(make_params(torch.float32), **kwargs)


@pytest.mark.parametrize("shape", [(3,), (2, 3, 4), ()], ids=str)
def test_non_2d_params_raise_torchs_error(shape):
    for cls in (torch.optim.Muon, fused_optim.Muon):
        bad = torch.zeros(shape, requires_grad=True)
        message = ("Muon only supports 2D parameters whereas we found a parameter with size: "
                   f"{bad.size()}")
        with pytest.raises(ValueError, match=re.escape(message)):
            cls([torch.zeros(2, 2, requires_grad=True), bad])


STEP_ERRORS = [
    ("complex", RuntimeError, "Muon does not support complex parameters"),
    ("sparse", RuntimeError, "Muon does not support sparse gradients"),
    ("ns_steps", ValueError, "Number of steps must be less than 100 for computational efficiency"),
    ("coefficients", ValueError, "Coefficients must be a tuple of exactly 3 values"),
    # (a float from a config file: torch's constructor takes it, its range() does not)
    ("float_ns_steps", TypeError, "'float' object cannot be interpreted as an integer"),
]


@pytest.mark.parametrize("case,exc,message", STEP_ERRORS, ids=[c[0] for c in STEP_ERRORS])
@pytest.mark.parametrize("later_step", [False, True], ids=["first_step", "later_step"])
def test_step_errors_are_torchs_and_change_nothing(case, exc, message, later_step):
    for cls in (torch.optim.Muon, fused_optim.Muon):
        ps = make_params(torch.float32, shapes=[(4, 6), (5, 3)])
        opt = cls(ps)
        if later_step:
            set_grads([ps], 0)
            opt.step()
        if case == "complex":
            c = torch.zeros(3, 3, dtype=torch.complex64, requires_grad=True)
            opt.add_param_group({"params": [c]})
            c.grad = torch.ones_like(c)
        set_grads([ps], 1)
        if case == "sparse":
            ps[1].grad = ps[1].grad.to_sparse()
        elif case == "ns_steps":
            opt.param_groups[0]["ns_steps"] = 100
        elif case == "coefficients":
            opt.param_groups[0]["ns_coefficients"] = (1.0, 2.0)
        elif case == "float_ns_steps":
            opt.param_groups[0]["ns_steps"] = 5.0
        before = [p.detach().clone() for p in ps]
        bufs = [opt.state[p]["momentum_buffer"].clone() for p in ps] if later_step else None
        with pytest.raises(exc, match=re.escape(message)):
            opt.step()
        # Where the error is about group 0 itself, we raise before changing anything
        # (torch's first param has its momentum by then). A complex param in group 1: both
        # update group 0, then raise.
        if cls is fused_optim.Muon and case != "complex":
            assert all(torch.equal(p, q) for p, q in zip(ps, before))
            if later_step:
                assert all(torch.equal(opt.state[p]["momentum_buffer"], b) for p, b in zip(ps, bufs))


@pytest.mark.parametrize("shape,adjust_lr_fn,exc,message", [
    ((4,), None, ValueError, "Param gradient must be a 2D matrix"),
    ((2, 3, 4), None, ValueError, "Param gradient must be a 2D matrix"),
    ((3, 0), None, ZeroDivisionError, "division by zero"),      # _adjust_lr's A / B
    ((3, 0), "original", ZeroDivisionError, "division by zero"),
], ids=str)
def test_step_errors_of_params_torchs_constructor_lets_in(shape, adjust_lr_fn, exc, message):
    # torch's constructor checks only the params it is given, so a param of other dims
    # comes in through add_param_group, and one of no columns through either: its step
    # raises (after updating the params before it); ours raises the same, changing nothing
    # in the param's group.
    for cls in (torch.optim.Muon, fused_optim.Muon):
        ps = make_params(torch.float32, shapes=[(4, 6), (5, 3)])
        bad = torch.zeros(shape, requires_grad=True)
        if len(shape) == 2:
            opt = cls(ps + [bad], adjust_lr_fn=adjust_lr_fn)
        else:
            opt = cls(ps, adjust_lr_fn=adjust_lr_fn)
            opt.add_param_group({"params": [bad]})
        set_grads([ps], 0)
        bad.grad = torch.ones_like(bad)
        before = [p.detach().clone() for p in ps]
        with pytest.raises(exc, match=re.escape(message)):
            opt.step()
        if cls is fused_optim.Muon and len(shape) == 2:
            assert all(torch.equal(p, q) for p, q in zip(ps, before))
            # torch's _init_group made every momentum buffer before the error: zeros
            assert all(not opt.state[p]["momentum_buffer"].any() for p in ps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("nesterov", [True, False])
def test_aten_path_matches_torch(dtype, nesterov):
    # The CUDA kernel's code (Note [Muon on CUDA]), run on the CPU as _muon_aten_.
    kwargs = _opts(dict(nesterov=nesterov))
    ref = make_params(dtype)
    ours = clone_params(ref)
    opt_ref = torch.optim.Muon(ref, **kwargs)
    opt_ours = fused_optim.Muon(ours, **kwargs)
    opt_ours._op = "_muon_aten_"
    for step in range(3):
        set_grads([ref, ours], step)
        opt_ref.step()
        opt_ours.step()
    assert_matches(ours, ref, opt_ours, opt_ref, kwargs, 3)
    if _blas_batches_like_torch(SHAPES):  # then also bitwise (on the CPU)
        for p, q in zip(ours, ref):
            assert torch.equal(p, q)


@pytest.mark.parametrize("op", ["muon_", "_muon_aten_"])
def test_bfloat16_buffer_normalized_in_place_only_where_the_installed_torch_does(op, monkeypatch):
    # Note [Muon's bfloat16 buffer] in muon.cpp: with bfloat16 params and nesterov=False,
    # torch before 2.15 divided the momentum buffer by its norm in place; torch 2.15 leaves
    # it as the momentum made it. fused_optim asks torch's own function which it is.
    from fused_optim import _support, muon

    assert muon._NORMALIZES_BUFFER == (_support._release(torch.__version__) < (2, 15))
    for flag in (muon._NORMALIZES_BUFFER, not muon._NORMALIZES_BUFFER):
        monkeypatch.setattr(muon, "_NORMALIZES_BUFFER", flag)
        kwargs = _opts(dict(nesterov=False))
        ref = make_params(torch.bfloat16, shapes=[(6, 6), (6, 6), (4, 9)])
        ours = clone_params(ref)
        opt_ref, opt_ours = torch.optim.Muon(ref, **kwargs), fused_optim.Muon(ours, **kwargs)
        opt_ours._op = op
        set_grads([ref, ours], 0)
        opt_ref.step()
        opt_ours.step()
        for p, q in zip(ours, ref):
            # the first step's buffer is (1 - momentum) * grad (norm about 0.05 * 6 here), or
            # that divided by its norm (1 within bfloat16's rounding)
            norm = opt_ref.state[q]["momentum_buffer"].float().norm().item()
            normalized = abs(norm - 1.0) < 0.02
            assert normalized == (_support._release(torch.__version__) < (2, 15))
            same = torch.equal(opt_ours.state[p]["momentum_buffer"],
                               opt_ref.state[q]["momentum_buffer"])
            assert same == (flag == muon._probe_normalizes_buffer())


def test_group_of_several_dtypes():
    # (The kernel hands such a group to the ATen-op path.)
    kwargs = _opts(dict(nesterov=False))
    ref = make_params(torch.float32)
    ref = [p.detach().to(dt).requires_grad_() for p, dt in
           zip(ref, [torch.float32, torch.bfloat16, torch.float64, torch.float16] * 3)]
    ours = clone_params(ref)
    opt_ref, opt_ours = torch.optim.Muon(ref, **kwargs), fused_optim.Muon(ours, **kwargs)
    for step in range(3):
        set_grads([ref, ours], step)
        opt_ref.step()
        opt_ours.step()
    assert_matches(ours, ref, opt_ours, opt_ref, kwargs, 3)


def test_op_passes_opcheck():
    ps = make_params(torch.float32, shapes=[(4, 6), (4, 6), (7, 3)])
    grads = [torch.randn_like(p) for p in ps]
    bufs = [torch.zeros_like(p) for p in ps]
    args = ([p.detach() for p in ps], grads, bufs, 0.02, 0.1, 0.95, True, 3.4445, -4.775,
            2.0315, 1e-7, 5, 0, False)
    torch.library.opcheck(torch.ops.fused_optim.muon_.default, args)


def test_compiled_step_matches_eager():
    kwargs = _opts({})
    ref = make_params(torch.float32, shapes=[(8, 8), (8, 8), (4, 12)])
    ours = clone_params(ref)
    opt_ref, opt_ours = torch.optim.Muon(ref, **kwargs), fused_optim.Muon(ours, **kwargs)

    @torch.compile(fullgraph=False)
    def step():
        opt_ours.step()

    for s in range(2):
        set_grads([ref, ours], s)
        opt_ref.step()
        step()
    assert_matches(ours, ref, opt_ours, opt_ref, kwargs, 2)


@pytest.mark.parametrize("threads", [1, 2])
def test_params_overlapping_across_shapes_step_in_list_order_as_torch(threads):
    """Note [Muon's overlapping params]: views of one flat buffer that overlap, of different
    shapes. torch's for-loop updates them in list order (the second's weight decay reads
    the first's result); the shape groups ran in another order, and side by side on two
    threads (171 of 200 runs differed from the first; found by a review, 2026-12-05). Now
    one group per param, in list order: bitwise torch's (2-D products, torch's own calls),
    5 steps, at 1 and 2 threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = []
        for cls in (torch.optim.Muon, fused_optim.Muon):
            flat = torch.randn(24 + 16 + 48 * 64, generator=torch.Generator().manual_seed(0))
            ps = [flat[0:12].view(3, 4), flat[6:18].view(4, 3), flat[12:24].view(3, 4),
                  flat[24:24 + 64 * 48].view(64, 48), flat[24 + 16:24 + 16 + 48 * 64].view(48, 64)]
            ps = [p.requires_grad_() for p in ps]
            opt = cls(ps, lr=0.1, weight_decay=0.1)
            for step in range(5):
                g = torch.Generator().manual_seed(step + 1)
                for p in ps:
                    p.grad = torch.randn(p.shape, generator=g)
                opt.step()
            out.append(flat.clone())
        assert torch.equal(out[0], out[1])
    finally:
        torch.set_num_threads(old)


def test_a_nan_eps_makes_every_param_nan_as_torchs_clamp():
    """torch's update.norm().clamp(min=eps) with eps NaN is NaN; ours kept the norm (found
    by a review, 2026-12-05)."""
    out = []
    for cls in (torch.optim.Muon, fused_optim.Muon):
        p = torch.nn.Parameter(torch.ones(3, 4))
        opt = cls([p], lr=0.02, eps=float("nan"))
        p.grad = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
        opt.step()
        out.append(p.detach().clone())
    assert out[0].isnan().all() and out[1].isnan().all()


@pytest.mark.parametrize("name", ["original", "match_rms_adamw", "spectral_unclamped", "no such"])
def test_every_adjust_lr_fn_as_the_installed_torch_computes_it(name):
    """adjust_lr_fn, set in a group (past the constructor's check of the names this torch
    knows): each step scaled as the installed torch's _adjust_lr scales it ("spectral_unclamped"
    is torch 2.14's sqrt(A / B): on older torch, as any name it does not know, no adjustment;
    found by test_torch_optim_db on torch 2.14.1), on a tall and a wide matrix."""
    steps, lr = 3, 0.02
    runs = []
    for cls in (torch.optim.Muon, fused_optim.Muon):
        g = torch.Generator().manual_seed(0)
        ps = [torch.randn(6, 3, generator=g).requires_grad_(), torch.randn(3, 6, generator=g).requires_grad_()]
        opt = cls(ps, lr=lr)
        opt.param_groups[0]["adjust_lr_fn"] = name
        for _ in range(steps):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        runs.append(ps)
    for p, q in zip(*reversed(runs)):
        # Note [Muon's tolerance]: 2^-4 of a step's size a step
        ratio = torch.optim._muon._adjust_lr(1.0, name, p.shape)
        # (a wrong adjustment, 1 for sqrt(2) say, moves a step ~lr * 0.4 * |update|:
        # several times this)
        torch.testing.assert_close(p, q, rtol=0, atol=steps * lr * ratio * 2**-4)
