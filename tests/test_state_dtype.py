"""The moments' dtype (state_dtype, Note [state storage] in csrc/plan.h): float32, bfloat16
or float16 moments beside float32 / 16-bit params, and 8-bit block-quantized moments
(torch.uint8, Note [8-bit state] in csrc/cpu/quant8.h), on every algorithm with moments.

Each is compared bit for bit with a reference built from torch.optim's for-loop: the update
computed in float32 on float32 copies (with the IEEE sqrt, as in test_parity.py), the param
then rounded to its dtype and each moment stored as state_dtype says. The 8-bit
quantization of the reference is written here, in numpy, from the paper's definition of
the maps; fused_optim/quantization.py is not used to check the kernels."""
import copy
import warnings

import numpy as np
import pytest
import torch

import fused_optim
from fused_optim import quantization
from parity_utils import correctly_rounded_sqrt

# Every algorithm with moments, with options that give it all its states.
CASES = [
    ("SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True)),
    ("Adam", dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
    ("AdamW", dict(lr=0.01, betas=(0.8, 0.9))),
    ("RMSprop", dict(lr=0.01, momentum=0.5, centered=True)),
    ("Adagrad", dict(lr=0.05, lr_decay=0.01)),
    # (a sum made by torch's constructor: in float32 first, then as state_dtype says; it was
    # rounded to a 16-bit param's dtype first: found by a review, 2026-12-06)
    ("Adagrad", dict(lr=0.05, initial_accumulator_value=0.1)),
    ("Adamax", dict(lr=0.01, weight_decay=0.1)),
    ("Adadelta", dict(lr=0.5)),
    ("NAdam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    ("RAdam", dict(lr=0.01, weight_decay=0.1)),
]
IDS = [f"{n}-{i}" for i, (n, _) in enumerate(CASES)]
MOMENTS = {"momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "square_avg",
           "grad_avg", "sum", "exp_inf", "acc_delta"}
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.uint8)
# Two 8-bit params (5,000 elements: 19 whole blocks and a short one; a 2-D one of 4,550),
# one small enough to keep float32 moments, and a 0-dim one.
SHAPES = [(5000,), (70, 65), (10,), ()]


# ---- the reference quantization (Dettmers et al., 2022) --------------------------------
def reference_map(signed):
    """The dynamic tree map: sign, a decade 10^(i-6) for i = 0..6, and a linear fraction
    in [0.1, 1] with 2^i (signed) or 2^(i+1) (unsigned) bins, each value the bin's middle;
    then 0 and 1. As float32, ascending."""
    values = [0.0, 1.0]
    decades = np.array([1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0])
    for i in range(7):
        bins = 2 ** i if signed else 2 ** (i + 1)
        middles = (0.1 + ((np.arange(bins) + 0.5) * 0.9) / bins) * decades[i]
        values += list(middles) + (list(-middles) if signed else [])
    out = np.sort(np.array(values, dtype=np.float64).astype(np.float32))
    assert out.size == 256 and np.unique(out).size == 256
    return out


MAPS = {True: reference_map(True), False: reference_map(False)}


def reference_quantize(x):
    """float32 array (flat) -> (uint8 codes, float32 scales): per block of 256, the
    unsigned map where no value is negative (its scale negated), codes of the nearest
    value (midpoints in float64 rounded to float32; a tie goes down)."""
    codes = np.zeros(x.size, dtype=np.uint8)
    scales = np.zeros((x.size + 255) // 256, dtype=np.float32)
    for b in range(scales.size):
        v = x[b * 256:(b + 1) * 256]
        nan = not bool(np.isfinite(v).all())  # (a NaN or an infinity: the block is NaN)
        amax = np.float32(np.nan) if nan else np.abs(v).max()
        signed = nan or bool((v < 0).any())
        scales[b] = amax if signed else -amax
        m = MAPS[signed]
        mids = ((m[:-1].astype(np.float64) + m[1:].astype(np.float64)) / 2).astype(np.float32)
        with np.errstate(invalid="ignore"):
            normed = (v / amax).astype(np.float32) if amax > 0 else np.zeros_like(v)
        codes[b * 256:(b + 1) * 256] = (normed[:, None] > mids[None, :]).sum(1)
    return codes, scales


def reference_dequantize(codes, scales):
    out = np.empty(codes.size, dtype=np.float32)
    for b in range(scales.size):
        m = MAPS[not np.signbit(scales[b])]
        out[b * 256:(b + 1) * 256] = m[codes[b * 256:(b + 1) * 256]] * np.abs(scales[b])
    return out


def quantized(p):
    return p.numel() >= 4096 and p.is_contiguous()


# ---- runs --------------------------------------------------------------------------------
def make_params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in SHAPES]


def grads_at(step, dtype):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=g).to(dtype) for s in SHAPES]


def run_ours(name, kwargs, pdtype, sdtype, steps, params=None, opt=None, start=0):
    params = make_params(pdtype) if params is None else params
    opt = getattr(fused_optim, name)(params, **kwargs, state_dtype=sdtype) if opt is None else opt
    for step in range(start, start + steps):
        for p, g in zip(params, grads_at(step, pdtype)):
            p.grad = g
        opt.step()
    return params, opt


def store_moment(v, sdtype, like):
    """A float32 moment as state_dtype keeps it, read back as float32."""
    if sdtype is torch.uint8:
        if not quantized(like):
            return v
        codes, scales = reference_quantize(v.detach().reshape(-1).numpy())
        return torch.from_numpy(reference_dequantize(codes, scales)).view(v.shape)
    return v.to(sdtype).float()


def run_reference(name, kwargs, pdtype, sdtype, steps):
    low = [p.detach().clone() for p in make_params(pdtype)]
    work = [p.float().requires_grad_() for p in low]
    opt = getattr(torch.optim, name)(work, foreach=False, **kwargs)
    with torch.no_grad():  # state made by the constructor (Adagrad's sum), stored as well
        for w in work:
            for k, v in opt.state[w].items():
                if k in MOMENTS and isinstance(v, torch.Tensor):
                    v.copy_(store_moment(v, sdtype, w))
    for step in range(steps):
        with torch.no_grad():
            for w, p in zip(work, low):
                w.copy_(p.float())
        for w, g in zip(work, grads_at(step, pdtype)):
            w.grad = g.float()
        with correctly_rounded_sqrt():
            opt.step()
        with torch.no_grad():
            for w, p in zip(work, low):
                p.copy_(w.to(pdtype))
                for k, v in opt.state[w].items():
                    if k in MOMENTS and isinstance(v, torch.Tensor):
                        v.copy_(store_moment(v, sdtype, w))
    return low, opt, work


def moment_as_float(state, key):
    v = state[key]
    if v.dtype == torch.uint8:
        return torch.from_numpy(reference_dequantize(
            v.reshape(-1).numpy(), state[key + "_absmax"].numpy())).view(v.shape)
    return v.float()


def assert_bitwise(a, b, what):
    torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=0, equal_nan=True, msg=what)


def expected_dtype(p, sdtype):
    if sdtype is torch.uint8 and not quantized(p):
        return torch.float32
    return sdtype


# ---- tests --------------------------------------------------------------------------------
def test_maps_are_the_papers():
    """quantization.py's maps (the kernels' are the same construction in C++, checked
    through every kernel test below) equal the reference's."""
    ours = quantization._VALUES.numpy()
    np.testing.assert_array_equal(ours[0], MAPS[True])
    np.testing.assert_array_equal(ours[1], MAPS[False])
    assert MAPS[True][0] > -1 and MAPS[True][-1] == 1 and MAPS[False][0] == 0


@pytest.mark.parametrize("sdtype", STATE_DTYPES, ids=str)
@pytest.mark.parametrize("pdtype", PARAM_DTYPES, ids=str)
@pytest.mark.parametrize("name,kwargs", CASES, ids=IDS)
def test_state_dtype_matches_the_float32_reference_bitwise(name, kwargs, pdtype, sdtype):
    """Five steps (the first on the general path, which makes the state, then the eager
    fast path): params and every moment, bit for bit; the moments in their dtype. (An
    8-bit moment is compared as the floats its codes and scale stand for: the reference
    keeps those; test_edge_blocks_through_the_kernel compares codes and scales.)"""
    params, opt = run_ours(name, kwargs, pdtype, sdtype, 5)
    low, ref, work = run_reference(name, kwargs, pdtype, sdtype, 5)
    for i, (p, r) in enumerate(zip(params, low)):
        assert p.dtype == pdtype
        assert_bitwise(p, r, f"param {i}")
        ours, theirs = opt.state[p], ref.state[work[i]]
        for k, v in theirs.items():
            if k in MOMENTS and isinstance(v, torch.Tensor):
                assert ours[k].dtype == expected_dtype(p, sdtype), f"{k} of param {i}"
                assert_bitwise(moment_as_float(ours, k), v, f"{k} of param {i}")
                if sdtype is torch.uint8 and not quantized(p):
                    assert ours[k + "_absmax"].numel() == 0  # (float32 moments)
            elif k == "step":
                assert float(ours[k]) == float(v)


@pytest.mark.parametrize("sdtype", STATE_DTYPES, ids=str)
@pytest.mark.parametrize("pdtype", PARAM_DTYPES, ids=str)
def test_adagrad_sum_starts_from_the_constructors_value_not_a_groups(pdtype, sdtype):
    """torch.optim.Adagrad's constructor fills every param's sum with its own
    initial_accumulator_value argument; a param group's value is never read (nor by
    _init_group, which takes the defaults'). With a state_dtype the sum is made again in
    float32 (test above): from the constructor's value too, so a group's own value changes
    nothing (until 2026-12-08 it was taken: found by a differential fuzz). Bitwise: the same
    run with and without the group's value."""
    def run(group_value):
        params = make_params(pdtype)
        group = {"params": params}
        if group_value is not None:
            group["initial_accumulator_value"] = group_value
        opt = fused_optim.Adagrad([group], lr=0.05, initial_accumulator_value=0.1,
                                  state_dtype=sdtype)
        made = [moment_as_float(opt.state[p], "sum").clone() for p in params]
        run_ours("Adagrad", {}, pdtype, sdtype, 3, params=params, opt=opt)
        return made, params, opt
    made, params, opt = run(0.5)
    made_ref, params_ref, opt_ref = run(None)
    for i, (p, r) in enumerate(zip(params, params_ref)):
        assert_bitwise(made[i], made_ref[i], f"sum of param {i} as made")
        assert bool((made[i] > 0.09).all() and (made[i] < 0.11).all())  # 0.1, not 0.5
        assert_bitwise(p, r, f"param {i}")
        assert_bitwise(moment_as_float(opt.state[p], "sum"),
                       moment_as_float(opt_ref.state[r], "sum"), f"sum of param {i}")
    if pdtype is torch.float32 and sdtype is torch.float32:  # torch's own, the anchor
        work = [p.detach().requires_grad_() for p in make_params(pdtype)]
        ref = torch.optim.Adagrad([{"params": work, "initial_accumulator_value": 0.5}],
                                  lr=0.05, initial_accumulator_value=0.1, foreach=False)
        for step in range(3):
            for w, g in zip(work, grads_at(step, pdtype)):
                w.grad = g
            with correctly_rounded_sqrt():
                ref.step()
        for i, (p, w) in enumerate(zip(params, work)):
            assert_bitwise(p, w, f"param {i} against torch")


def test_quantization_module_matches_the_reference():
    """fused_optim.quantization (checkpoint conversion) quantizes as the kernels do."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5000, generator=g) * torch.logspace(-8, 1, 5000)
    x[:300] = x[:300].abs()  # a block with no negative value: the unsigned map
    x[600:856] = 0.0         # an all-zero block
    x[1200] = float("nan")   # a NaN block
    x[1300] = float("inf")   # blocks with an infinity (NaN blocks too)
    x[1600] = -float("inf")
    codes, scales = quantization.quantize(x)
    rc, rs = reference_quantize(x.numpy())
    assert_bitwise(codes, torch.from_numpy(rc), "codes")
    assert_bitwise(scales, torch.from_numpy(rs), "scales")
    assert_bitwise(quantization.dequantize(codes, scales), torch.from_numpy(reference_dequantize(rc, rs)),
                   "dequantized")
    assert torch.isnan(quantization.dequantize(codes, scales)[1024:1792]).all()
    assert not torch.isnan(quantization.dequantize(codes, scales)[1792:]).any()


def assert_kernel_quantizes_as_reference(x):
    """x (float32, flat numpy) through the kernel's quantization: SGD's momentum buffer is
    the grad on its first step, so the 8-bit buffer is x quantized as it is. Its codes and
    scales must be the reference's; returns the param's state for further checks."""
    p = torch.zeros(x.size, requires_grad=True)
    p.grad = torch.from_numpy(x.copy())
    opt = fused_optim.SGD([p], lr=0.1, momentum=0.9, state_dtype=torch.uint8)
    opt.step()
    rc, rs = reference_quantize(x)
    s = opt.state[p]
    assert_bitwise(s["momentum_buffer_absmax"], torch.from_numpy(rs), "scales")
    assert_bitwise(s["momentum_buffer"], torch.from_numpy(rc), "codes")
    return s


def test_edge_blocks_through_the_kernel():
    """Blocks of zeros, of non-negative values, with a NaN, and huge/tiny magnitudes go
    through the kernel's quantization as through the reference's (SGD's momentum is the
    grad on its first step, so the buffer is exactly the quantized grad)."""
    g = torch.randn(4096, generator=torch.Generator().manual_seed(1)) * torch.logspace(-30, 30, 4096)
    g[:256] = 0.0
    g[256:512] = g[256:512].abs()
    g[700] = float("nan")
    g[1024:1280] = 1e-38
    g[1300] = float("inf")   # an infinity: a NaN block (Note [8-bit state])
    g[1600:1856] = g[1600:1856].abs()
    g[1700] = float("inf")   # in a block that would take the unsigned map
    g[2000] = -float("inf")
    s = assert_kernel_quantizes_as_reference(g.numpy())
    scales = s["momentum_buffer_absmax"]
    assert torch.signbit(scales[:2]).all()  # unsigned map
    assert torch.isnan(scales[[2, 5, 6, 7]]).all() and not torch.isnan(scales[[3, 4, 8]]).any()


def blocks_around_thresholds(amax, signed):
    """Blocks of 256 whose absmax is `amax` (their first value), the rest the values at
    and within 2 ulps of every threshold of the map times amax: where a quotient v / amax
    off by one ulp would change a code."""
    m = MAPS[signed]
    mids = ((m[:-1].astype(np.float64) + m[1:].astype(np.float64)) / 2).astype(np.float32)
    centre = (mids.astype(np.float64) * float(amax)).astype(np.float32)
    values = [centre]
    up, down = centre, centre
    for _ in range(2):
        up = np.nextafter(up, np.float32(np.inf))
        down = np.nextafter(down, np.float32(-np.inf))
        values += [up, down]
    v = np.concatenate(values)
    v = v[np.abs(v) <= amax]
    if not signed:
        v = v[v >= 0]
    per = 255
    blocks = []
    for start in range(0, v.size, per):
        chunk = v[start:start + per]
        blocks.append(np.concatenate([[np.float32(amax)], chunk,
                                      np.zeros(per - chunk.size, np.float32)]))
    return np.concatenate(blocks).astype(np.float32)


def test_codes_at_every_threshold_for_many_scales():
    """The kernel's codes equal the reference's (x = v / absmax, correctly rounded) for
    values at and around every threshold, with absmax from 2^-70 to 2^126, both maps: the
    AVX-512 copies find x without a division (Note [8-bit without division] in
    csrc/cpu/multi_tensor.h), which must not change a code anywhere."""
    rng = np.random.default_rng(3)
    scales = [2.0**e for e in (-70, -61, -60, -59, -30, -1, 0, 1, 30, 99, 100, 101, 126)]
    scales += list((2.0 ** rng.uniform(-70, 126, 40)).astype(np.float32))
    scales += [np.nextafter(np.float32(2.0**-60), np.float32(0)), np.float32(3.0e38)]
    data = np.concatenate([blocks_around_thresholds(np.float32(a), signed)
                           for a in scales for signed in (True, False)])
    assert_kernel_quantizes_as_reference(data)


def test_codes_of_values_over_many_binades():
    """Random values over 60 binades, both signs and both maps (blocks with and without a
    negative value), through the kernel's quantization as through the reference's: the
    codes found by arithmetic (Note [8-bit codes by arithmetic] in csrc/cpu/multi_tensor.h)
    fall in every decade of the maps and next to every threshold between decades."""
    g = torch.Generator().manual_seed(5)
    n = 256 * 400
    x = torch.rand(n, generator=g) * torch.pow(2.0, -torch.randint(0, 60, (n,), generator=g).float())
    x = torch.where(torch.rand(n, generator=g) < 0.5, -x, x)
    x[: n // 2] = x[: n // 2].abs()  # blocks of the unsigned map
    x[::256] = torch.rand(n // 256, generator=g) + 0.5  # each block's absmax in [0.5, 1.5)
    assert_kernel_quantizes_as_reference(x.numpy())


CODE_TESTS = ("test_codes_at_every_threshold_for_many_scales",
              "test_codes_of_values_over_many_binades", "test_edge_blocks_through_the_kernel",
              "test_threads_do_not_change_a_bit")


@pytest.mark.parametrize("codes", ["gather", "arithmetic"])
def test_code_tests_with_each_way_of_finding_codes(codes):
    """The code tests above with each of the AVX-512 copies' ways of finding a code forced
    (FUSED_OPTIM_Q8_CODES; the choice is made once per process, so in a process of its
    own): the table's gather and the arithmetic give the reference's codes. (On a CPU
    without AVX-512 both run the same code.)"""
    import os
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          *[f"{__file__}::{t}" for t in CODE_TESTS]],
                         env=dict(os.environ, FUSED_OPTIM_Q8_CODES=codes), capture_output=True,
                         text=True, timeout=600, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"{len(CODE_TESTS)} passed" in out.stdout, out.stdout[-3000:]


def run_big(threads):
    """AdamW with 8-bit moments on three params of 70,001 elements, at `threads`."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        big = [torch.randn(70001, generator=torch.Generator().manual_seed(i)).requires_grad_()
               for i in range(3)]
        opt = fused_optim.AdamW(big, lr=0.01, state_dtype=torch.uint8)
        for step in range(3):
            for i, p in enumerate(big):
                p.grad = torch.randn(70001, generator=torch.Generator().manual_seed(10 * step + i))
            opt.step()
    finally:
        torch.set_num_threads(old)
    return [p.detach() for p in big] + [opt.state[p][k] for p in big
                                        for k in ("exp_avg", "exp_avg_absmax", "exp_avg_sq")]


def test_threads_do_not_change_a_bit():
    """A block is one thread's: 1 and 2 threads give the same bits (the threads' ranges
    start inside tensors)."""
    for a, b in zip(run_big(1), run_big(2)):
        assert_bitwise(a, b, "1 vs 2 threads")


def test_fast_path_takes_8_bit_groups():
    """After the first step every param has its moments and scales: the eager fast path
    (csrc/python_step.cpp) takes the group, the mode's and the scales' lists merged into
    the op's param_aux."""
    params, opt = run_ours("Adam", dict(lr=0.01, amsgrad=True), torch.bfloat16, torch.uint8, 1,)
    opt.param_groups[0]["params"] = params
    for p, g in zip(params, grads_at(1, torch.bfloat16)):
        p.grad = g
    group = opt.param_groups[0]
    keys = opt._step_keys(group)
    assert keys[-3:] == ("exp_avg_absmax", "exp_avg_sq_absmax", "max_exp_avg_sq_absmax")
    args = fused_optim._ops.schema_args(opt._op, opt._step_kwargs(group), None, None)
    with torch.no_grad():
        assert fused_optim._C._step(opt._op, [group["params"]], opt.state, [keys], [args])


def test_fast_path_takes_8_bit_moments_where_the_layout_says_so():
    # The fast path's test of which moments are 8-bit (csrc/python_step.cpp: kQuantMinNumel,
    # contiguity) agrees with quantization.quantizes at its boundary; and it declines,
    # changing nothing, a param whose layout no longer fits its moments.
    n = quantization.MIN_NUMEL
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(n, generator=g).requires_grad_(),
              torch.randn(n - 1, generator=g).requires_grad_(),
              torch.randn(65, 64, generator=g).t().requires_grad_()]
    opt = fused_optim.Adam(params, lr=0.01, state_dtype=torch.uint8)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    assert [opt.state[p]["exp_avg"].dtype for p in params] == [
        torch.uint8, torch.float32, torch.float32]
    group = opt.param_groups[0]
    keys = opt._step_keys(group)
    args = fused_optim._ops.schema_args(opt._op, opt._step_kwargs(group), None, None)
    with torch.no_grad():
        assert fused_optim._C._step(opt._op, [group["params"]], opt.state, [keys], [args])
        # The other layout, the same Parameter: the 8-bit one strided, the transposed one
        # contiguous (each alone).
        for p, other in ((params[0], lambda t: torch.empty(2 * n)[::2].copy_(t)),
                         (params[2], lambda t: t.contiguous())):
            old = p.data
            p.data = other(p.detach())
            kept = p.detach().clone()
            states = {k: v.clone() for k, v in opt.state[p].items()}
            assert not fused_optim._C._step(opt._op, [group["params"]], opt.state, [keys], [args])
            assert torch.equal(p, kept)
            assert all(torch.equal(opt.state[p][k], v) for k, v in states.items())
            p.data = old
        assert fused_optim._C._step(opt._op, [group["params"]], opt.state, [keys], [args])


def test_memory_per_param():
    """Optimizer state bytes per param as the theory says: Adam's two moments in 8 bits
    are 2 bytes plus 2 scales of 4 bytes per 256 elements; in bf16, 4 bytes."""
    p = torch.zeros(2 ** 16, requires_grad=True)
    for sdtype, want in ((torch.uint8, 2 + 8 / 256), (torch.bfloat16, 4.0), (torch.float32, 8.0)):
        opt = fused_optim.Adam([p], lr=0.01, state_dtype=sdtype)
        p.grad = torch.ones_like(p)
        opt.step()
        nbytes = sum(v.numel() * v.element_size() for k, v in opt.state[p].items() if k != "step")
        assert nbytes / p.numel() == want, sdtype


# ---- checkpoints -----------------------------------------------------------------------
@pytest.mark.parametrize("sdtype", STATE_DTYPES, ids=str)
def test_checkpoint_resumes_bit_for_bit(sdtype):
    """A state_dict of any state_dtype loads back into the same and continues bit for bit
    (moments keep their dtype: torch's load_state_dict would cast them to the param's)."""
    name, kwargs = "Adam", dict(lr=0.01, amsgrad=True)
    want, opt_want = run_ours(name, kwargs, torch.float32, sdtype, 4)
    params, opt = run_ours(name, kwargs, torch.float32, sdtype, 2)
    saved = copy.deepcopy(opt.state_dict())
    fresh = [p.detach().clone().requires_grad_() for p in params]
    opt2 = fused_optim.Adam(fresh, **kwargs, state_dtype=sdtype)
    opt2.load_state_dict(saved)
    run_ours(name, kwargs, torch.float32, sdtype, 2, params=fresh, opt=opt2, start=2)
    for i, (a, b) in enumerate(zip(want, fresh)):
        assert_bitwise(a, b, f"param {i}")
        for k, v in opt_want.state[a].items():
            assert v.dtype == opt2.state[b][k].dtype, k
            assert_bitwise(v, opt2.state[b][k], f"{k} of param {i}")


def test_torch_checkpoint_loads_into_8_bit_and_back():
    """A torch.optim checkpoint loads into state_dtype=torch.uint8 (quantized as it loads);
    fused_optim.to_torch_state_dict turns an 8-bit checkpoint into one torch.optim loads,
    with the dequantized moments."""
    params = make_params(torch.float32)
    topt = torch.optim.AdamW(params, lr=0.01)
    for p, g in zip(params, grads_at(0, torch.float32)):
        p.grad = g
    topt.step()
    ours = fused_optim.AdamW(params, lr=0.01, state_dtype=torch.uint8)
    ours.load_state_dict(topt.state_dict())
    for p in params:
        s, t = ours.state[p], topt.state[p]
        for k in ("exp_avg", "exp_avg_sq"):
            if quantized(p):
                codes, scales = reference_quantize(t[k].reshape(-1).numpy())
                assert_bitwise(s[k].view(-1), torch.from_numpy(codes), k)
                assert_bitwise(s[k + "_absmax"], torch.from_numpy(scales), k)
            else:
                assert_bitwise(s[k], t[k], k)
    ours.step()
    back = torch.optim.AdamW(params, lr=0.01)
    back.load_state_dict(fused_optim.to_torch_state_dict(ours.state_dict()))
    for p in params:
        assert set(back.state[p]) == {"step", "exp_avg", "exp_avg_sq"}
        for k in ("exp_avg", "exp_avg_sq"):
            assert back.state[p][k].dtype == p.dtype
            assert_bitwise(back.state[p][k], moment_as_float(ours.state[p], k), k)


def test_8_bit_checkpoint_into_another_state_dtype_is_refused():
    params, opt = run_ours("Adam", dict(lr=0.01), torch.float32, torch.uint8, 1)
    other = fused_optim.Adam(params, lr=0.01)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match=r"8-bit moments .*state_dtype=torch.uint8"):
        other.load_state_dict(opt.state_dict())
    assert other.state_dict() == before


def test_8_bit_moments_without_scales_are_refused_before_anything_loads():
    params, opt = run_ours("Adam", dict(lr=0.01), torch.float32, torch.uint8, 1)
    sd = copy.deepcopy(opt.state_dict())
    del sd["state"][1]["exp_avg_sq_absmax"]
    sd["param_groups"][0]["lr"] = 0.5
    target = fused_optim.Adam(params, lr=0.01, state_dtype=torch.uint8)
    run_ours("Adam", dict(lr=0.01), torch.float32, torch.uint8, 1, params=params, opt=target)
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match=r"state 'exp_avg_sq' of param 1 is 8-bit \(uint8\) "
                                         r"but has no 'exp_avg_sq_absmax' scales"):
        target.load_state_dict(sd)
    after = target.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for i, s in before["state"].items():
        assert all(torch.equal(after["state"][i][k], v) for k, v in s.items())


def test_8_bit_moments_without_scales_are_refused_without_state_dtype_too():
    """An 8-bit checkpoint whose scales were stripped, loaded into an optimizer without
    state_dtype: refused as with its scales (the codes loaded as moment values before,
    found by a review), nothing loaded."""
    params, opt = run_ours("Adam", dict(lr=0.01), torch.float32, torch.uint8, 1)
    sd = copy.deepcopy(opt.state_dict())
    for s in sd["state"].values():
        for k in [k for k in s if k.endswith("_absmax")]:
            del s[k]
    target = fused_optim.Adam(params, lr=0.01)
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match=r"8-bit moments .*state_dtype=torch.uint8"):
        target.load_state_dict(sd)
    assert target.state_dict() == before


@pytest.mark.parametrize("name", ["Adam", "AdamW", "RMSprop", "Adagrad", "Adadelta", "NAdam",
                                  "RAdam", "SGD", "Adamax"])
def test_float16_state_of_squared_grads_warns(name):
    """state_dtype=torch.float16 on an algorithm that keeps squared grads warns at
    construction that their small values underflow (a review: Adam with grads of 1e-4 lost
    exp_avg_sq entirely and stepped 18x as far as torch's); SGD and Adamax keep none."""
    p = torch.zeros(3, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        getattr(fused_optim, name)([p], lr=0.01, state_dtype=torch.float16)
        getattr(fused_optim, name)([p], lr=0.01, state_dtype=torch.bfloat16)
    messages = [str(w.message) for w in caught if "state_dtype=torch.float16" in str(w.message)]
    assert len(messages) == (0 if name in ("SGD", "Adamax") else 1), messages
    assert all("torch.bfloat16 keeps float32's range" in m for m in messages)


def test_8_bit_moments_follow_a_param_whose_layout_changes():
    # model.to(memory_format=...) keeps the Parameter objects and changes their layout. A
    # param's moments are 8-bit where it quantizes (contiguous, 4,096 elements or more),
    # float32 elsewhere: a step after the change converts them (dequantized, or quantized),
    # on the fast path as on the general one, and a checkpoint then resumes bit for bit.
    def model():
        torch.manual_seed(0)
        return torch.nn.Conv2d(32, 64, 3)  # a weight of 18,432 elements, a bias of 64

    def step(conv, opt, i, channels_last):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        conv.to(memory_format=fmt)
        g = torch.Generator().manual_seed(i)
        conv(torch.randn(2, 32, 8, 8, generator=g).to(memory_format=fmt)).square().mean().backward()
        opt.step()
        opt.zero_grad()

    layouts = [False, True, True, False, False, True]  # each step's: channels_last or not
    runs = []
    for fast in (True, False):
        conv = model()
        opt = fused_optim.AdamW(conv.parameters(), lr=1e-2, state_dtype=torch.uint8)
        opt._fast_path = fast
        dtypes = []
        for i, cl in enumerate(layouts):
            step(conv, opt, i, cl)
            dtypes.append(opt.state[conv.weight]["exp_avg"].dtype)
        runs.append((conv, opt, dtypes))
    (conv, opt, dtypes), (ref, ref_opt, ref_dtypes) = runs
    assert dtypes == ref_dtypes == [torch.uint8 if not cl else torch.float32 for cl in layouts]
    for p, q in zip(conv.parameters(), ref.parameters()):
        assert torch.equal(p, q)
        for k, v in ref_opt.state[q].items():
            assert torch.equal(opt.state[p][k], v), k
    # A checkpoint after steps 0-2 (float32 moments) resumes as the run that went on.
    conv = model()
    opt = fused_optim.AdamW(conv.parameters(), lr=1e-2, state_dtype=torch.uint8)
    for i, cl in enumerate(layouts[:3]):
        step(conv, opt, i, cl)
    resumed = fused_optim.AdamW(conv.parameters(), lr=1e-2, state_dtype=torch.uint8)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    for i, cl in enumerate(layouts[3:], start=3):
        step(conv, resumed, i, cl)
    for p, q in zip(conv.parameters(), ref.parameters()):
        assert torch.equal(p, q)
        for k, v in ref_opt.state[q].items():
            assert torch.equal(resumed.state[p][k], v), k


def test_8_bit_checkpoint_of_small_params_loads_into_torchs_state():
    """An 8-bit checkpoint whose params are all under 4,096 elements has no quantized
    moment (each keeps float32 ones and empty scales): it loads into an optimizer without
    state_dtype as a float checkpoint does, with torch's keys, and steps as one loaded from
    to_torch_state_dict's checkpoint (bitwise: the same kernel on the same values)."""
    shapes = [(70, 50), (10,), ()]
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(2)]

    def step(opt, params, gs):
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()

    params = [t.clone().requires_grad_() for t in start]
    opt = fused_optim.AdamW(params, lr=0.01, state_dtype=torch.uint8)
    step(opt, params, grads[0])
    saved = copy.deepcopy(opt.state_dict())
    assert all(v["exp_avg_absmax"].numel() == 0 for v in saved["state"].values())
    runs = []
    # (deep copies: a loaded state shares the checkpoint's step tensors, as torch's does)
    for sd in (copy.deepcopy(saved), fused_optim.to_torch_state_dict(copy.deepcopy(saved))):
        ps = [p.detach().clone().requires_grad_() for p in params]
        o = fused_optim.AdamW(ps, lr=0.01)
        o.load_state_dict(sd)
        assert [set(o.state[p]) for p in ps] == [{"step", "exp_avg", "exp_avg_sq"}] * len(ps)
        step(o, ps, grads[1])
        runs.append((o, ps))
    (plain, a_params), (want, b_params) = runs
    for i, (a, b) in enumerate(zip(a_params, b_params)):
        assert_bitwise(a, b, f"param {i}")
        for k in ("exp_avg", "exp_avg_sq"):
            assert_bitwise(plain.state[a][k], want.state[b][k], f"{k} of param {i}")


def test_float_state_dtype_checkpoint_converts_between_dtypes():
    """A bfloat16-moment checkpoint loads into a float32-moment optimizer (widened), and a
    torch one into state_dtype=torch.bfloat16 (rounded)."""
    params, opt = run_ours("RMSprop", dict(lr=0.01, centered=True), torch.float32, torch.bfloat16, 1)
    wide = fused_optim.RMSprop(params, lr=0.01, centered=True, state_dtype=torch.float32)
    wide.load_state_dict(opt.state_dict())
    for p in params:
        assert wide.state[p]["square_avg"].dtype == torch.float32
        assert_bitwise(wide.state[p]["square_avg"], opt.state[p]["square_avg"].float(), "widened")
    topt = torch.optim.RMSprop(params, lr=0.01, centered=True)
    for p, g in zip(params, grads_at(0, torch.float32)):
        p.grad = g
    topt.step()
    narrow = fused_optim.RMSprop(params, lr=0.01, centered=True, state_dtype=torch.bfloat16)
    narrow.load_state_dict(topt.state_dict())
    for p in params:
        assert_bitwise(narrow.state[p]["grad_avg"], topt.state[p]["grad_avg"].bfloat16(), "rounded")


# ---- errors --------------------------------------------------------------------------------
def test_bad_state_dtype_is_refused():
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="state_dtype must be None"):
        fused_optim.Adam([p], state_dtype=torch.int32)
    with pytest.raises(ValueError, match="state_dtype must be None"):
        fused_optim.Adam([p], state_dtype="bfloat16")
    for name in ("Rprop", "ASGD"):
        with pytest.raises(ValueError, match=f"state_dtype does not apply to {name}"):
            getattr(fused_optim, name)([p], state_dtype=torch.bfloat16)
    q = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="param 1 of param group 0 has dtype torch.float64"):
        fused_optim.Adam([p, q], state_dtype=torch.bfloat16)
    opt = fused_optim.Adam([p], state_dtype=torch.uint8)
    with pytest.raises(ValueError, match="param 0 of param group 1 has dtype torch.float64"):
        opt.add_param_group({"params": [q]})
    assert len(opt.param_groups) == 1
    # torch's own step cannot keep the moments in state_dtype: refused, not ignored
    for sdtype in (torch.bfloat16, torch.uint8):
        with pytest.raises(RuntimeError, match=rf"differentiable=True \(param group 0\), .* "
                                               rf"state_dtype={sdtype}"):
            fused_optim.Adam([p], lr=0.1, differentiable=True, state_dtype=sdtype)
        opt = fused_optim.Adam([p], lr=0.1, state_dtype=sdtype)
        opt.param_groups[0]["differentiable"] = True
        p.grad = torch.ones_like(p)
        with torch.no_grad(), pytest.raises(
                RuntimeError, match=rf"differentiable=True.* state_dtype={sdtype}"):
            opt.step()
        assert torch.equal(p.detach(), torch.zeros(3)) and not opt.state


def test_op_checks_8_bit_arguments():
    """The op's own checks, before anything changes: a uint8 state needs contiguous
    tensors and its scales."""
    p = torch.randn(64, 80).t()  # not contiguous; its 8-bit states share its strides
    g = torch.randn(80, 64)
    m = torch.zeros(64, 80, dtype=torch.uint8).t()
    v = torch.zeros(64, 80, dtype=torch.uint8).t()
    step = torch.tensor(0.0)
    sc = [torch.zeros(20), torch.zeros(20)]
    op = torch.ops.fused_optim.adam_
    args = dict(lr=0.01, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False,
                maximize=False, decoupled_weight_decay=False)
    before = p.clone()
    with pytest.raises(RuntimeError, match=r"8-bit state \(uint8\): it and its param must be contiguous"):
        op([p], [g], [m], [v], [], [step], **args, param_aux=sc)
    p, m, v = p.contiguous(), m.contiguous(), v.contiguous()
    with pytest.raises(RuntimeError, match="no block scales"):
        op([p], [g], [m], [v], [], [step], **args)
    with pytest.raises(RuntimeError, match="of 20 elements"):
        op([p], [g], [m], [v], [], [step], **args, param_aux=[torch.zeros(19), torch.zeros(20)])
    with pytest.raises(RuntimeError, match="of 20 elements .* on the param's device"):
        op([p], [g], [m], [v], [], [step], **args,
           param_aux=[torch.zeros(20, dtype=torch.float64), torch.zeros(20)])
    with pytest.raises(RuntimeError, match="of 20 elements .* on the param's device"):
        op([p], [g], [m], [v], [], [step], **args, param_aux=[torch.zeros(20, device="meta"), torch.zeros(20)])
    with pytest.raises(RuntimeError, match="one scale tensor per rule state and param"):
        op([p], [g], [m], [v], [], [step], **args, param_aux=sc[:1])
    assert float(step) == 0.0
    assert_bitwise(p, before.contiguous(), "unchanged")


@pytest.mark.parametrize("other", [torch.complex64, torch.float64])
def test_op_refuses_other_params_beside_a_state_of_another_dtype(other):
    """A call whose float32 param has a bfloat16 state runs the storage loops, which take
    float32, bfloat16 and float16 params only: a complex64 or float64 param in the same
    call is refused before a step is counted or anything written. (The optimizers never
    make such a call: state_dtype refuses those params.)"""
    p = [torch.randn(300), torch.randn(70, dtype=other)]
    g = [torch.randn(300), torch.randn(70, dtype=other)]
    m = [torch.randn(300).bfloat16(), torch.randn(70, dtype=other)]
    v = [torch.rand(300).bfloat16(), torch.rand(70, dtype=other)]
    steps = [torch.tensor(3.0), torch.tensor(3.0)]
    before = [t.clone() for t in p + m + v]
    with pytest.raises(RuntimeError, match=r"applies to float32, bfloat16 and float16 params "
                                           r"only; params\[1\] has dtype"):
        torch.ops.fused_optim.adam_(p, g, m, v, [], steps, lr=0.01, beta1=0.9, beta2=0.999,
                                    weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False,
                                    decoupled_weight_decay=False)
    assert [float(s) for s in steps] == [3.0, 3.0]
    for a, b in zip(p + m + v, before):
        assert_bitwise(a, b, "unchanged")


def test_grad_scaler_inf_step_changes_nothing():
    params, opt = run_ours("Adam", dict(lr=0.01), torch.float32, torch.uint8, 1)
    before = copy.deepcopy(opt.state_dict())
    snapshot = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.full_like(p, float("inf"))
    opt.grad_scale = torch.tensor(1.0)
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    del opt.grad_scale, opt.found_inf
    for p, s in zip(params, snapshot):
        assert_bitwise(p, s, "param")
    after = opt.state_dict()
    for pid, s in before["state"].items():
        for k, v in s.items():
            assert_bitwise(after["state"][pid][k], v, k)


# ---- with a param storage mode -----------------------------------------------------------
@pytest.mark.parametrize("mode", ["kahan_summation", "stochastic_rounding", "master_weights"])
@pytest.mark.parametrize("sdtype", [torch.float32, torch.uint8], ids=str)
def test_state_dtype_with_a_param_storage_mode(mode, sdtype):
    """bfloat16 params kept by a mode (Note [param storage]) with moments in state_dtype:
    bit for bit the float32 reference doing both (test_param_storage.py's run, its
    reference storing the moments as above)."""
    import test_param_storage

    name, kwargs, dtype, steps = "AdamW", dict(lr=0.01, betas=(0.8, 0.9)), torch.bfloat16, 5
    params, opt, seeds = test_param_storage.run_ours(name, kwargs, mode, dtype, steps,
                                                     shapes=SHAPES, state_dtype=sdtype)
    low, ref, work, aux = test_param_storage.run_reference(
        name, kwargs, mode, dtype, steps, seeds, shapes=SHAPES,
        store_state=lambda v, w: store_moment(v, sdtype, w))
    for i, (p, r) in enumerate(zip(params, low)):
        assert_bitwise(p, r, f"param {i}")
        for k in ("exp_avg", "exp_avg_sq"):
            assert opt.state[p][k].dtype == expected_dtype(p, sdtype)
            assert_bitwise(moment_as_float(opt.state[p], k), ref.state[work[i]][k], f"{k} of param {i}")
        if mode == "master_weights":
            assert_bitwise(opt.state[p]["master_param"], aux[i], f"master of param {i}")
        if mode == "kahan_summation":
            assert_bitwise(opt.state[p]["kahan_comp"], aux[i], f"comp of param {i}")


def test_subclass_params_are_refused_for_8_bit_state():
    """8-bit moments take plain tensors and DTensors (quantized shard by shard: Note
    [8-bit DTensors]); another subclass is refused when the optimizer is made."""
    class Sub(torch.Tensor):
        pass

    p = torch.zeros(5000).as_subclass(Sub).requires_grad_()
    with pytest.raises(RuntimeError, match="plain tensors and DTensors only .* param 0 of param group 0 is a Sub"):
        fused_optim.Adam([p], state_dtype=torch.uint8)


ISA_SCRIPT = r"""
import hashlib, torch, fused_optim
torch.manual_seed(0)  # (stochastic rounding's seeds are drawn from torch's generator)
h = hashlib.sha256()
# (the float states beside params of another dtype go through Note [storage modes in
# registers] in the vector copies, through the storage loop's buffers in the baseline)
for dtype, sdtype, mode in ((torch.float32, torch.uint8, {}), (torch.bfloat16, torch.uint8, {"kahan_summation": True}),
                            (torch.float16, torch.float32, {"master_weights": True}), (torch.float32, torch.bfloat16, {}),
                            (torch.float32, torch.uint8, {"amsgrad": True}), (torch.float32, torch.float16, {}),
                            (torch.bfloat16, torch.float32, {}), (torch.float16, torch.float32, {"kahan_summation": True}),
                            (torch.bfloat16, torch.float32, {"stochastic_rounding": True}),
                            (torch.float16, torch.float32, {"stochastic_rounding": True}),
                            (torch.bfloat16, torch.float32, {"kahan_summation": True}),
                            (torch.bfloat16, torch.float32, {"master_weights": True})):
    g = torch.Generator().manual_seed(0)
    # (last blocks of 136, 5 and 48 elements after whole ones: Note [8-bit state a block behind])
    params = [torch.randn(s, generator=g).to(dtype).requires_grad_()
              for s in ((5000,), (70, 65), (10,), (4101,), (4144,))]
    opt = fused_optim.AdamW(params, lr=0.01, state_dtype=sdtype, **mode)
    for step in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(dtype)
        opt.step()
    for p in params:
        for t in [p.detach()] + [v for v in opt.state[p].values()]:
            h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
print(h.hexdigest())
"""


def test_every_isa_copy_gives_the_same_bits():
    """The storage loop and the 8-bit quantization of each ISA copy (Note [ISA dispatch];
    FUSED_OPTIM_ISA caps the copy) store the same bits: params and every state hashed.
    (The AVX-512 copies quantize a block while the rule runs on the next, the baseline's
    as each block ends: Note [8-bit state a block behind].)"""
    import os
    import subprocess
    import sys

    digests = {}
    for isa in ("baseline", "avx2", "avx512", "avx512bf16"):
        env = dict(os.environ, FUSED_OPTIM_ISA=isa, FUSED_OPTIM_FLOAT_LOOPS="avx512")
        out = subprocess.run([sys.executable, "-c", ISA_SCRIPT], capture_output=True, text=True,
                             env=env, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        digests[isa] = out.stdout.strip()
    assert len(set(digests.values())) == 1, digests


@pytest.mark.parametrize("name", ["Adam", "RMSprop", "NAdam"])
def test_new_8_bit_moments_are_made_without_quantizing_float32_zeros(name, monkeypatch):
    """A new moment was made as float32 zeros and quantized: about 28 bytes of temporaries
    an element, so the first step of an 8-bit optimizer peaked at several times the float32
    state's memory (found by a review, 2026-12-05: 55 MiB for 4 MiB of 8-bit Adam state).
    Now made as codes and scales of zeros directly (quantization.zeros: quantize's bits,
    checked here for sizes around the blocks), and the first steps are bitwise the same as
    through quantize."""
    for n in (4096, 4097, 4351, 65539):
        codes, scales = quantization.zeros(torch.empty(n))
        ref_codes, ref_scales = quantization.quantize(torch.zeros(n))
        assert torch.equal(codes, ref_codes)
        assert torch.equal(scales.view(torch.int32), ref_scales.view(torch.int32))

    def run(direct):
        if not direct:  # (the previous way: float32 zeros, then quantized)
            monkeypatch.setattr(quantization, "zeros",
                                lambda p: quantization.quantize(torch.zeros_like(p, dtype=torch.float32)))
        calls = []
        real = quantization.quantize
        monkeypatch.setattr(quantization, "quantize", lambda x: calls.append(1) or real(x))
        ps = [torch.randn(8192, generator=torch.Generator().manual_seed(0)).requires_grad_(),
              torch.randn(100, generator=torch.Generator().manual_seed(1)).requires_grad_()]
        opt = getattr(fused_optim, name)(ps, lr=0.01, state_dtype=torch.uint8)
        for step in range(3):
            for i, p in enumerate(ps):
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * step + i))
            opt.step()
        monkeypatch.undo()
        return calls, [p.detach().clone() for p in ps], {
            (i, k): v.clone() for i, p in enumerate(ps) for k, v in opt.state[p].items()}

    calls, params, state = run(direct=True)
    ref_calls, ref_params, ref_state = run(direct=False)
    assert not calls and ref_calls
    assert all(torch.equal(a, b) for a, b in zip(params, ref_params))
    assert state.keys() == ref_state.keys()
    assert all(torch.equal(state[k], ref_state[k]) for k in state)
