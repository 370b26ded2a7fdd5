"""How 16-bit params are kept between steps (Note [param storage] in csrc/plan.h):
kahan_summation, stochastic_rounding and master_weights, on every elementwise algorithm.

Each mode is compared bit for bit with a reference built from torch.optim's for-loop: the
update computed in float32 on float32 copies (with the IEEE sqrt, as in test_parity.py),
the param and state then stored as the mode says, written here in Python (stochastic
rounding's generator in numpy: Note [stochastic rounding] in csrc/rounding.h)."""
import copy
import pickle
import warnings

import numpy as np
import pytest
import torch

import fused_optim
from parity_utils import correctly_rounded_sqrt

MODES = ("kahan_summation", "stochastic_rounding", "master_weights")
KEYS = {"kahan_summation": "kahan_comp", "stochastic_rounding": "rounding_state",
        "master_weights": "master_param"}
DTYPES = (torch.bfloat16, torch.float16)
# Every elementwise algorithm, with options that give it states and weight decay.
CASES = [
    ("SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
    ("Adam", dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
    ("AdamW", dict(lr=0.01, betas=(0.8, 0.9))),
    ("RMSprop", dict(lr=0.01, momentum=0.5, centered=True)),
    ("Adagrad", dict(lr=0.05, lr_decay=0.01)),
    ("Adamax", dict(lr=0.01, weight_decay=0.1)),
    ("Adadelta", dict(lr=0.5)),
    ("NAdam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    ("RAdam", dict(lr=0.01, weight_decay=0.1)),
    # (lr is Rprop's first step_size, made in the param's dtype: one 16-bit values hold,
    # so the float32 reference starts from the same step sizes)
    ("Rprop", dict(lr=2.0 ** -7)),
    ("ASGD", dict(lr=0.01, t0=1.0, weight_decay=0.1)),
]
SCALARS = {"step", "mu_product", "eta", "mu"}  # 0-dim states: not rounded to 16 bits
# 1,000 elements (several 256-element blocks and a tail), one 2-D param, one scalar.
SHAPES = [(1000,), (37, 29), ()]
MASK = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


def mix64(z):
    """SplitMix64's output function, on Python ints."""
    z &= MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def hash32(x):
    """Wellons' lowbias32, on numpy uint32 arrays (csrc/rounding.h)."""
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def stochastic_round(x, dtype, seed, counter):
    """Note [stochastic rounding]: float32 tensor x (contiguous) rounded to `dtype` with the
    stream of (seed, counter), element i with the i-th bits."""
    stream = mix64((seed & MASK) + counter * GOLDEN)
    lo, hi = np.uint32(stream & 0xFFFFFFFF), np.uint32(stream >> 32)
    n = x.numel()
    with np.errstate(over="ignore"):
        bits = hash32((np.arange(n, dtype=np.uint32) + hi) ^ lo)
    xs = x.detach().contiguous().view(-1).numpy().astype(np.float32)
    if dtype == torch.bfloat16:
        u = xs.view(np.uint32)
        mag = u & np.uint32(0x7FFFFFFF)
        with np.errstate(over="ignore"):
            out = ((u + (bits & np.uint32(0xFFFF))) >> np.uint32(16)).astype(np.uint16)
        out = np.where(mag == 0x7F800000, (u >> 16).astype(np.uint16), out)
        out = np.where(mag > 0x7F800000, np.uint16(0x7FC0), out)
        return torch.from_numpy(out.view(np.int16).copy()).view(torch.bfloat16).view(x.shape)
    u = xs.view(np.uint32)
    sign = u & np.uint32(0x80000000)
    with np.errstate(over="ignore"):
        normal = (((u & np.uint32(0x7FFFFFFF)) + (bits >> np.uint32(19))) & np.uint32(~0x1FFF & 0xFFFFFFFF)) | sign
    normal = normal.view(np.float32)
    a = np.abs(xs)
    s = (a * np.float32(2.0 ** 24)).astype(np.float32)
    lo = np.trunc(s).astype(np.float32)
    u24 = (bits >> np.uint32(8)).astype(np.float32) * np.float32(2.0 ** -24)
    sub = (np.where(u24 < s - lo, lo + np.float32(1), lo) * np.float32(2.0 ** -24)).astype(np.float32)
    sub = np.where(sign != 0, -sub, sub)
    r = np.where(a >= np.float32(2.0 ** -14), normal, sub)
    r = np.where(a < 65504.0, r, xs)  # overflow, inf, NaN: to nearest
    return torch.from_numpy(r).to(torch.float16).view(x.shape)


def make_params(dtype, seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in shapes]


def grads_at(step, dtype, shapes=SHAPES):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=g).to(dtype) for s in shapes]


def run_ours(name, kwargs, mode, dtype, steps, threads=None, shapes=SHAPES, **options):
    """`options`: more of the optimizer's (test_state_dtype.py adds state_dtype)."""
    params = make_params(dtype, shapes=shapes)
    opt = getattr(fused_optim, name)(params, **kwargs, **{mode: True}, **options)
    seeds = None
    for step in range(steps):
        for p, g in zip(params, grads_at(step, dtype, shapes)):
            p.grad = g
        opt.step()
        if seeds is None and mode == "stochastic_rounding":
            seeds = [int(opt.state[p]["rounding_state"][0]) for p in params]
    return params, opt, seeds


def run_reference(name, kwargs, mode, dtype, steps, seeds, shapes=SHAPES, store_state=None):
    """torch's for-loop in float32 on float32 copies, each step's param stored as `mode`
    says and its states rounded to `dtype` (as run_rounded_reference in parity_utils), or
    stored as `store_state(state, float32 param)` returns them (test_state_dtype.py)."""
    low = [p.detach().clone() for p in make_params(dtype, shapes=shapes)]
    work = [p.float().requires_grad_() for p in low]
    opt = getattr(torch.optim, name)(work, foreach=False, **kwargs)
    comp = [torch.zeros_like(p) for p in low]
    master = [p.float() for p in low]
    for step in range(steps):
        with torch.no_grad():
            for i, w in enumerate(work):
                if mode == "kahan_summation":
                    w.copy_(low[i].float() + comp[i].float())
                elif mode == "master_weights":
                    w.copy_(master[i])
                else:
                    w.copy_(low[i].float())
        for w, g in zip(work, grads_at(step, dtype, shapes)):
            w.grad = g.float()
        with correctly_rounded_sqrt():
            opt.step()
        with torch.no_grad():
            for i, w in enumerate(work):
                if mode == "kahan_summation":
                    low[i].copy_(w.to(dtype))
                    comp[i].copy_((w - low[i].float()).to(dtype))
                elif mode == "master_weights":
                    master[i].copy_(w)
                    low[i].copy_(w.to(dtype))
                else:
                    low[i].copy_(stochastic_round(w, dtype, seeds[i], step + 1))
            for w, s in opt.state.items():
                for k, v in s.items():
                    if k not in SCALARS:
                        v.copy_(v.to(dtype) if store_state is None else store_state(v, w))
    aux = {"kahan_summation": comp, "master_weights": master}.get(mode)
    return low, opt, work, aux


def assert_bitwise(a, b, what):
    a, b = a.detach(), b.detach()
    assert a.dtype == b.dtype and a.shape == b.shape, what
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=what)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name,kwargs", CASES, ids=[c[0] for c in CASES])
def test_mode_matches_the_float32_reference_bitwise(name, kwargs, mode, dtype):
    """Five steps (the first on the general path, which makes the state, then the eager
    fast path): params, every state and the mode's buffer, bit for bit."""
    steps = 5
    params, opt, seeds = run_ours(name, kwargs, mode, dtype, steps)
    low, ref, work, aux = run_reference(name, kwargs, mode, dtype, steps, seeds)
    for i, (p, r) in enumerate(zip(params, low)):
        assert_bitwise(p, r, f"param {i}")
        ours, theirs = opt.state[p], ref.state[work[i]]
        assert set(ours) == set(theirs) | {KEYS[mode]}, f"state keys of param {i}"
        for k, v in theirs.items():
            want = v if k in SCALARS else v.to(dtype)
            assert_bitwise(ours[k], want, f"state {k} of param {i}")
        if aux is not None:
            assert_bitwise(ours[KEYS[mode]], aux[i], f"{KEYS[mode]} of param {i}")
        else:  # rounding_state: the seed drawn when the optimizer was made, a step counted
            assert ours["rounding_state"].dtype == torch.int64
            assert ours["rounding_state"].tolist() == [seeds[i], steps]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_small_updates_accumulate(mode, dtype):
    """The point of the modes: 400 SGD steps of a tenth of a 16-bit ulp each. Rounded to
    nearest, every one is lost (the param stays 1.0); kept by a mode, they add up to 40
    ulps. Master weights: float32's sum, within 400 float32 roundings (< 0.01 ulp). Kahan:
    the compensation is itself rounded to 16 bits each step (an error below 2^-9 ulp in
    bfloat16), within one ulp. Stochastic rounding: each step moves an element up one ulp
    with probability 0.1, so it ends at Binomial(400, 0.1) ulps (std 6); the mean of 4,096
    elements is within 0.5 ulp of 40 (more than 5 standard errors)."""
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10  # at 1.0
    def train(**options):
        torch.manual_seed(0)  # (the generator's seed: the same bits whatever ran before)
        p = torch.ones(4096, dtype=dtype, requires_grad=True)
        opt = fused_optim.SGD([p], lr=0.1 * ulp, **options)
        for _ in range(400):
            p.grad = torch.full_like(p, -1.0)
            opt.step()
        return p.detach().float()
    assert torch.equal(train(), torch.ones(4096))  # round to nearest: nothing moved
    moved = (train(**{mode: True}) - 1.0) / ulp
    if mode == "stochastic_rounding":
        assert abs(moved.mean().item() - 40.0) < 0.5
        assert moved.std().item() > 3.0  # and the elements did round differently
    else:
        atol = 0.01 if mode == "master_weights" else 1.0
        torch.testing.assert_close(moved, torch.full_like(moved, 40.0), rtol=0, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stochastic_rounding_is_unbiased(dtype):
    """One step puts 2**20 params at 1 + 0.3 ulp: rounded stochastically, 30% of them go
    up. The mean error is 0 within 5 standard errors (0.46 ulp / sqrt(2**20) each), where
    round-to-nearest's is -0.3 ulp."""
    n = 1 << 20
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    p = torch.ones(n, dtype=dtype, requires_grad=True)
    torch.manual_seed(0)  # (the generator's seed: the same bits whatever ran before)
    opt = fused_optim.SGD([p], lr=0.3 * ulp, stochastic_rounding=True)
    p.grad = torch.full_like(p, -1.0)
    opt.step()
    err = (p.detach().double() - (1.0 + 0.3 * ulp)) / ulp
    sigma = (0.3 * 0.7) ** 0.5 / n ** 0.5
    assert abs(err.mean().item()) < 5 * sigma
    assert set(torch.unique(p.detach().float()).tolist()) == {1.0, 1.0 + ulp}


def test_stochastic_rounding_is_reproducible_at_any_thread_count():
    """The same seed gives the same bits at 1 and 2 threads (a param big enough for both
    threads to work on it), and a different seed other bits."""
    def run(threads, seed):
        torch.manual_seed(seed)
        p = (torch.arange(200_000, dtype=torch.float32) / 7e5).to(torch.bfloat16).requires_grad_()
        opt = fused_optim.AdamW([p], lr=1e-3, stochastic_rounding=True)
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for step in range(3):
                p.grad = torch.sin(torch.arange(200_000.0) * (step + 1)).to(torch.bfloat16)
                opt.step()
        finally:
            torch.set_num_threads(before)
        return p.detach()
    one, two = run(1, seed=5), run(2, seed=5)
    assert torch.equal(one.view(torch.int16), two.view(torch.int16))
    assert not torch.equal(one.view(torch.int16), run(2, seed=6).view(torch.int16))


def test_kahan_checkpoint_loads_onto_params_of_the_other_16bit_dtype():
    """A Kahan checkpoint of bfloat16 params loaded onto float16 ones: the compensation
    is converted to the param's dtype as the moments are (it stayed bfloat16, and every
    step then failed), and the optimizer steps; onto the same dtype it loads bit for bit."""
    torch.manual_seed(0)
    p = torch.randn(64, dtype=torch.bfloat16, requires_grad=True)
    opt = fused_optim.Adam([p], lr=0.01, kahan_summation=True)
    for _ in range(2):
        p.grad = torch.randn(64).bfloat16()
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    q = p.detach().half().requires_grad_()
    other = fused_optim.Adam([q], lr=0.01, kahan_summation=True)
    other.load_state_dict(saved)
    comp = other.state[q]["kahan_comp"]
    assert comp.dtype == torch.float16
    assert torch.equal(comp, saved["state"][0]["kahan_comp"].half())
    q.grad = torch.randn(64).half()
    other.step()
    assert q.isfinite().all()
    r = p.detach().clone().requires_grad_()
    same = fused_optim.Adam([r], lr=0.01, kahan_summation=True)
    same.load_state_dict(saved)
    for k, v in saved["state"][0].items():
        assert torch.equal(same.state[r][k], v) and same.state[r][k].dtype == v.dtype


def test_stochastic_rounding_checkpoint_covers_params_that_had_not_stepped():
    """A param with no grad before the checkpoint gets, after a resume in an optimizer
    made under another generator state, the seed it would have had: the saving optimizer's
    seed comes back from a saved param's (Note [stochastic rounding]). Params bitwise the
    uninterrupted run's."""
    def grad(i):
        return torch.full((300,), 1e-3 * (i + 1), dtype=torch.bfloat16)

    def run(resume):
        torch.manual_seed(0)
        a = torch.ones(300, dtype=torch.bfloat16, requires_grad=True)
        b = a.detach().clone().requires_grad_()
        opt = fused_optim.SGD([a, b], lr=1.0, stochastic_rounding=True)
        for i in range(2):
            a.grad, b.grad = grad(i), None  # b: no grad, so no state, before the checkpoint
            opt.step()
        if resume:
            saved = copy.deepcopy(opt.state_dict())
            assert len(saved["state"]) == 1
            torch.manual_seed(1)  # (another seed drawn as the new optimizer is made)
            a, b = (t.detach().clone().requires_grad_() for t in (a, b))
            opt = fused_optim.SGD([a, b], lr=1.0, stochastic_rounding=True)
            opt.load_state_dict(saved)
        for i in range(2, 5):
            a.grad, b.grad = grad(i), grad(i)
            opt.step()
        return a.detach(), b.detach(), opt.state[b]["rounding_state"].clone()

    uninterrupted, resumed = run(False), run(True)
    for x, y in zip(uninterrupted, resumed):
        assert torch.equal(x, y)
    # (the rounding did draw: updates of 1e-3 on 1.0 are below half a bfloat16 ulp)
    assert not torch.equal(resumed[1], torch.ones(300, dtype=torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_of_a_shard_draws_its_elements_bits(dtype):
    """A shard given [seed, counter, offset] (how the optimizers pass a DTensor's local
    shard: Note [stochastic rounding] in csrc/rounding.h) is rounded with the random bits
    of its elements in the whole param: the shards updated one by one give the whole
    param's bits (cut at offsets that are not multiples of a vector), and each call counts
    the step. Given [seed, counter] only, a shard would draw the bits of the param's start."""
    n = 5000
    start = (torch.arange(n, dtype=torch.float32) / 7e3 + 0.5).to(dtype)
    grad = torch.sin(torch.arange(n, dtype=torch.float32)).to(dtype)
    sgd = torch.ops.fused_optim.sgd_
    # lr * grad is below half an ulp of the params (2^-9 for bfloat16 near 1): each result
    # is decided by its random bits
    common = dict(lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                  maximize=False, is_first_step=False, param_mode=2)
    whole = start.clone()
    sgd([whole], [grad], [], **common, param_aux=[torch.tensor([12345, 7])])
    assert not torch.equal(whole, start)
    cuts = (0, 1000, 2345, 2346, 5000)
    shards = []
    for a, b in zip(cuts, cuts[1:]):
        shard, state = start[a:b].clone(), torch.tensor([12345, 7, a])
        sgd([shard], [grad[a:b].clone()], [], **common, param_aux=[state])
        assert state.tolist() == [12345, 8, a]
        shards.append(shard)
    assert torch.equal(torch.cat(shards).view(torch.int16), whole.view(torch.int16))
    alone = start[2346:].clone()
    sgd([alone], [grad[2346:].clone()], [], **common, param_aux=[torch.tensor([12345, 7])])
    assert not torch.equal(alone.view(torch.int16), whole[2346:].view(torch.int16))


RESUME_CASES = [
    ("AdamW", dict(lr=0.01, weight_decay=0.1)),
    # 0-dim float states (mu_product; eta and mu): torch's load would cast them to the
    # param's dtype, and every later step would change
    ("NAdam", dict(lr=0.01, momentum_decay=4e-3)),
    ("ASGD", dict(lr=0.01, t0=1.0)),
]


@pytest.mark.parametrize("name,kwargs", RESUME_CASES, ids=[c[0] for c in RESUME_CASES])
@pytest.mark.parametrize("mode", MODES)
def test_checkpoint_resumes_bit_for_bit(mode, name, kwargs):
    """A state_dict of a mode, loaded into a new optimizer of the same mode, continues
    exactly as the run that was not interrupted (the buffer keeps its dtype: torch's
    load_state_dict would cast it to the param's; so do the scalar states)."""
    dtype = torch.bfloat16
    params, opt, _ = run_ours(name, kwargs, mode, dtype, steps=3)
    saved_params = [p.detach().clone() for p in params]
    saved = copy.deepcopy(opt.state_dict())
    for step in range(3, 6):
        for p, g in zip(params, grads_at(step, dtype)):
            p.grad = g
        opt.step()
    resumed = [p.clone().requires_grad_() for p in saved_params]
    opt2 = getattr(fused_optim, name)(resumed, **kwargs, **{mode: True})
    opt2.load_state_dict(saved)
    key = KEYS[mode]
    assert opt2.state[resumed[0]][key].dtype == opt.state[params[0]][key].dtype
    for k in opt2._scalar_state_keys:
        assert opt2.state[resumed[0]][k].dtype == opt.state[params[0]][k].dtype == torch.float32
    for step in range(3, 6):
        for p, g in zip(resumed, grads_at(step, dtype)):
            p.grad = g
        opt2.step()
    for i, (a, b) in enumerate(zip(params, resumed)):
        assert_bitwise(a, b, f"param {i}")
        for k, v in opt.state[a].items():
            assert_bitwise(opt2.state[b][k], v, f"state {k} of param {i}")


@pytest.mark.parametrize("mode", MODES)
def test_torch_checkpoint_loads_into_a_mode(mode):
    """torch.optim's checkpoint (no buffer) starts a mode: the buffer is made at the next
    step from the param as it is (master: its float32 value; Kahan: zero compensation)."""
    params = make_params(torch.bfloat16)
    topt = torch.optim.AdamW(params, lr=0.01)
    for p, g in zip(params, grads_at(0, torch.bfloat16)):
        p.grad = g
    topt.step()
    ours = [p.detach().clone().requires_grad_() for p in params]
    opt = fused_optim.AdamW(ours, lr=0.01, **{mode: True})
    opt.load_state_dict(topt.state_dict())
    for p, g in zip(ours, grads_at(1, torch.bfloat16)):
        p.grad = g
    opt.step()
    for p in ours:
        assert KEYS[mode] in opt.state[p] and opt.state[p]["step"].item() == 2.0


def edit_params(params):
    """Changes made to 16-bit params outside the optimizer, each leaving some elements as
    they were: a clamp under no_grad (bounds that the 16-bit dtypes hold exactly), a pruning
    mask written through .data (whose version counter is not the param's), and a copy over
    the whole of the 0-dim param (as model.load_state_dict does)."""
    with torch.no_grad():
        params[0].clamp_(-0.5, 0.5)
    params[1].data[::3] = 0
    with torch.no_grad():
        params[2].copy_(torch.tensor(0.25))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["master_weights", "kahan_summation"])
@pytest.mark.parametrize("name,kwargs", CASES, ids=[c[0] for c in CASES])
def test_an_edit_of_the_params_stands(name, kwargs, mode, dtype):
    """Params changed in place between steps keep the change, as with torch.optim.
    Master weights (Note [master follows the param] in csrc/plan.h): the elements the edit
    changed continue from the edited value, those it left keep their float32 master's extra
    bits. Kahan summation: the compensation, which belongs to the old value, is added to
    the new one (at most half an ulp of the old value; checking for it cost 8% of the step
    in A/B runs on 2026-12-04, so it is not checked). Reference: the float32 for-loop of
    run_reference, whose master takes the edited value exactly where the edit changed the
    16-bit param, or whose compensation stays. Three steps, the edit, two more (the step
    after it on the eager fast path); params, states and the mode's buffer bit for bit."""
    params = make_params(dtype)
    opt = getattr(fused_optim, name)(params, **kwargs, **{mode: True})
    low = [p.detach().clone() for p in params]
    work = [p.float().requires_grad_() for p in low]
    ref = getattr(torch.optim, name)(work, foreach=False, **kwargs)
    master = [p.float() for p in low]
    comp = [torch.zeros_like(p) for p in low]
    for step in range(5):
        if step == 3:
            edit_params(params)
            before = [p.clone() for p in low]
            edit_params(low)
            for m, b, a in zip(master, before, low):
                changed = b.view(torch.int16) != a.view(torch.int16)
                m.copy_(torch.where(changed, a.float(), m))
            assert any(not torch.equal(b, a) for b, a in zip(before, low))
            assert all(torch.equal(p.detach(), a) for p, a in zip(params, low))
        for p, w, g in zip(params, work, grads_at(step, dtype)):
            p.grad, w.grad = g, g.float()
        opt.step()
        with torch.no_grad():
            for i, w in enumerate(work):
                if mode == "master_weights":
                    w.copy_(master[i])
                else:
                    w.copy_(low[i].float() + comp[i].float())
        with correctly_rounded_sqrt():
            ref.step()
        with torch.no_grad():
            for i, w in enumerate(work):
                master[i].copy_(w)
                low[i].copy_(w.to(dtype))
                comp[i].copy_((w - low[i].float()).to(dtype))
            for s in ref.state.values():
                for k, v in s.items():
                    if k not in SCALARS:
                        v.copy_(v.to(dtype))
    aux = master if mode == "master_weights" else comp
    for i, (p, w) in enumerate(zip(params, work)):
        assert_bitwise(p, low[i], f"param {i}")
        assert_bitwise(opt.state[p][KEYS[mode]], aux[i], f"{KEYS[mode]} of param {i}")
        for k, v in ref.state[w].items():
            want = v if k in SCALARS else v.to(dtype)
            assert_bitwise(opt.state[p][k], want, f"state {k} of param {i}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["master_weights", "stochastic_rounding"])
def test_pruned_params_stay_zero(mode, dtype):
    """A pruning mask (zeros written into the param) with the pruned elements' grads zero
    too: plain SGD leaves them at zero, as torch.optim does (master weights: before Note
    [master follows the param], the old master brought them back at the next step; Kahan
    summation adds its old compensation, up to half an ulp of the old value: not here)."""
    p = torch.full((1000,), 1.0, dtype=dtype, requires_grad=True)
    opt = fused_optim.SGD([p], lr=1e-2, **{mode: True})
    for _ in range(3):  # steps of 0.003 (0.4 bfloat16 ulp, 3.1 float16 ulps): a compensation
        p.grad = torch.full_like(p, -0.3)
        opt.step()
    mask = torch.arange(1000) % 3 == 0
    with torch.no_grad():
        p[mask] = 0
    for _ in range(3):
        p.grad = torch.where(mask, 0.0, -0.3).to(dtype)
        opt.step()
    assert (p.detach()[mask] == 0).all()
    assert p.detach()[~mask].float().mean() > 1.01  # (the others moved on: 0.018 in all)


def test_master_weights_take_the_params_over_a_checkpoint_of_other_params():
    """A checkpoint's masters loaded beside params that are not the ones they were the
    masters of (the optimizer's checkpoint without the model's): the params stand, as with
    torch.optim, whose step starts from them. The next step is bit for bit that of the same
    checkpoint without its masters (made from the params: test_torch_checkpoint_loads_into_a_mode)."""
    params, opt, _ = run_ours("AdamW", dict(lr=0.01), "master_weights", torch.bfloat16, steps=3)
    sd = opt.state_dict()
    bare = copy.deepcopy(sd)
    for s in bare["state"].values():
        del s["master_param"]
    # (every element other than the checkpoint's param, so every master is the param's)
    others = [(p.detach().float() + 1).to(torch.bfloat16) for p in params]
    assert all((a != p).all() for a, p in zip(others, params))
    runs = []
    for checkpoint in (sd, bare):
        ps = [p.detach().clone().requires_grad_() for p in others]
        o = fused_optim.AdamW(ps, lr=0.01, master_weights=True)
        o.load_state_dict(checkpoint)
        for p, g in zip(ps, grads_at(3, torch.bfloat16)):
            p.grad = g
        o.step()
        runs.append((ps, o))
    (ps, o), (qs, q) = runs
    for i, (p, r) in enumerate(zip(ps, qs)):
        assert_bitwise(p, r, f"param {i}")
        assert_bitwise(o.state[p]["master_param"], q.state[r]["master_param"], f"master {i}")


def test_checkpoint_of_another_mode_is_refused():
    params, opt, _ = run_ours("Adam", dict(lr=0.01), "master_weights", torch.bfloat16, steps=1)
    sd = opt.state_dict()
    plain = fused_optim.Adam([p.detach().clone().requires_grad_() for p in params], lr=0.01)
    with pytest.raises(ValueError, match=r"param 0 .*'master_param' \(master_weights=True\)"):
        plain.load_state_dict(sd)
    assert not plain.state  # nothing loaded
    kahan = fused_optim.Adam([p.detach().clone().requires_grad_() for p in params], lr=0.01,
                             kahan_summation=True)
    with pytest.raises(ValueError, match="master_weights=True"):
        kahan.load_state_dict(sd)
    # (the message names the way to a checkpoint without the mode: float32 params, say,
    # cannot have master weights)
    with pytest.raises(ValueError, match="fused_optim.to_torch_state_dict"):
        plain.load_state_dict(sd)


@pytest.mark.parametrize("options", [dict(master_weights=True), dict(state_dtype=torch.float32),
                                     dict(state_dtype=torch.uint8), {}], ids=str)
def test_load_hooks_see_the_checkpoint_and_the_state_as_torchs_do(options):
    # torch runs the load pre-hooks on the checkpoint as given and the post-hooks on the
    # state as loaded: with a mode or a state_dtype too, whose buffers and moments the load
    # keeps apart from torch's (a hook that edits them, or converts the checkpoint, counts).
    dtype = torch.bfloat16 if "master_weights" in options else torch.float32
    params, opt, _ = run_ours("Adam", dict(lr=0.01), "master_weights", dtype, steps=1) if (
        "master_weights" in options) else (None, None, None)
    if opt is None:
        params = make_params(dtype)
        opt = fused_optim.Adam(params, lr=0.01, **options)
        for p, g in zip(params, grads_at(0, dtype)):
            p.grad = g
        opt.step()
    sd = opt.state_dict()
    seen = {}
    target = fused_optim.Adam([p.detach().clone().requires_grad_() for p in params], lr=0.01,
                              **options)

    def pre_hook(o, state_dict):
        seen["pre"] = sorted(state_dict["state"][0])
        new = copy.deepcopy(state_dict)
        for s in new["state"].values():
            s["step"] = s["step"] + 5  # an edit of the checkpoint stands
        return new

    def post_hook(o):
        seen["post"] = sorted(o.state[o.param_groups[0]["params"][0]])

    target.register_load_state_dict_pre_hook(pre_hook)
    target.register_load_state_dict_post_hook(post_hook)
    target.load_state_dict(sd)
    assert seen["pre"] == sorted(sd["state"][0]) == seen["post"]
    assert all(s["step"].item() == 6.0 for s in target.state.values())
    if "state_dtype" in options or not options:
        # A pre-hook that turns an 8-bit checkpoint into torch's: a plain optimizer loads it.
        plain = fused_optim.Adam([p.detach().clone().requires_grad_() for p in params], lr=0.01)
        plain.register_load_state_dict_pre_hook(
            lambda o, state_dict: fused_optim.to_torch_state_dict(state_dict))
        plain.load_state_dict(sd)
        assert all(v.dtype == torch.float32 for s in plain.state.values() for v in s.values())


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.uint8], ids=str)
def test_old_sgd_checkpoint_with_a_none_momentum_buffer_loads(state_dtype):
    # torch.optim.SGD without momentum saved `momentum_buffer: None` in torch 2.2 and
    # before; torch's load keeps it, and so do we, with a state_dtype too.
    p = torch.ones(10, requires_grad=True)
    old = {"state": {0: {"momentum_buffer": None}},
           "param_groups": [{"lr": 0.1, "momentum": 0.9, "dampening": 0, "weight_decay": 0,
                             "nesterov": False, "maximize": False, "foreach": None,
                             "differentiable": False, "fused": None, "params": [0]}]}
    opt = fused_optim.SGD([p], lr=0.05, momentum=0.9, state_dtype=state_dtype)
    opt.load_state_dict(copy.deepcopy(old))
    assert opt.state[p] == {"momentum_buffer": None} and opt.param_groups[0]["lr"] == 0.1
    p.grad = torch.full((10,), 2.0)
    opt.step()  # the first step with momentum: the buffer is the grad, as torch makes it
    assert torch.equal(p.detach(), torch.full((10,), 1.0 - 0.1 * 2.0))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name,handoff", [("Adagrad", "fused"), ("Adagrad", "max_grad_norm"),
                                          ("Adam", "fused"), ("SGD", "max_grad_norm")])
def test_a_skipped_first_step_makes_no_state_in_a_storage_mode(name, mode, handoff):
    """A GradScaler's first step skipped (an inf grad) makes no state, whether the kernel
    takes the scale (fused=True, max_grad_norm=) or unscale_ runs and step() is not
    called: Adagrad's state exists from its constructor, and the skipped step had made its
    mode's master_param or kahan_comp, which unscale_'s path does not (found by a fuzz,
    2026-12-07). The next real steps then match the unscale_ path's, bitwise."""
    kw = {"Adagrad": dict(lr=0.1), "Adam": dict(lr=0.01), "SGD": dict(lr=0.1, momentum=0.9)}
    results = []
    for how in (handoff, "unscale_"):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(40).bfloat16())
        # (the kernel takes GradScaler's scale: fused=True, or max_grad_norm=, where
        # nothing is clipped)
        extra = {"fused": dict(fused=True), "max_grad_norm": dict(max_grad_norm=1e30),
                 "unscale_": {}}[how]
        opt = getattr(fused_optim, name)([p], **kw[name], **extra, **{mode: True})
        if how == "unscale_":
            opt._step_supports_amp_scaling = False  # (GradScaler unscales, then steps)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        keys = []
        for step in range(3):
            g = torch.linspace(-1, 1, 40).bfloat16()
            if step == 0:
                g[3] = float("inf")
            scaler.scale(torch.ones(()))
            p.grad = (g.float() * scaler.get_scale()).bfloat16()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scaler.step(opt)
            scaler.update()
            keys.append(sorted(opt.state.get(p, {})))
        results.append((keys, p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}))
    assert results[0][0] == results[1][0]
    assert_bitwise(results[0][1], results[1][1], "param")
    for k, v in results[1][2].items():
        if k != "rounding_state":
            assert_bitwise(results[0][2][k], v, k)


@pytest.mark.parametrize("mode", MODES)
def test_grad_scaler_unscales_and_skips(mode):
    """With a GradScaler's scale the kernel unscales in the storage loop too, as torch's
    unscale_ then step would (a power of two: the 16-bit unscaled grads are exact either
    way); an inf step changes nothing at all: params, states, buffers and the stochastic
    rounding's counter."""
    dtype = torch.bfloat16
    params = make_params(dtype)
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    torch.manual_seed(0)  # the same rounding seeds for both (drawn when each is made)
    opt = fused_optim.Adam(params, lr=0.01, **{mode: True})
    torch.manual_seed(0)
    ref = fused_optim.Adam(ref_params, lr=0.01, **{mode: True})
    scale = torch.tensor(1024.0)
    for step in range(2):
        grads = grads_at(step, dtype)
        for p, q, g in zip(params, ref_params, grads):
            p.grad = (g.float() * 1024.0).to(dtype)
            q.grad = p.grad.float().mul_(scale.double().reciprocal().float()).to(dtype)
        opt.grad_scale, opt.found_inf = scale, torch.tensor(0.0)
        opt.step()
        ref.step()
    for p, q in zip(params, ref_params):
        assert_bitwise(p, q, "param")
        for k in ref.state[q]:
            assert_bitwise(opt.state[p][k], ref.state[q][k], k)
    state = copy.deepcopy(opt.state_dict())
    kept = [p.detach().clone() for p in params]
    opt.grad_scale, opt.found_inf = scale, torch.tensor(1.0)
    opt.step()
    for p, k in zip(params, kept):
        assert_bitwise(p, k, "param after an inf step")
    for i, s in state["state"].items():
        for k, v in s.items():
            assert_bitwise(opt.state_dict()["state"][i][k], v, f"{k} after an inf step")


def test_bad_options_are_refused_before_anything_changes():
    p16 = torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)
    p32 = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="kahan_summation and stochastic_rounding cannot be combined"):
        fused_optim.Adam([p16], kahan_summation=True, stochastic_rounding=True)
    with pytest.raises(ValueError, match="master_weights and stochastic_rounding cannot be combined|stochastic_rounding and master_weights cannot be combined"):
        fused_optim.Adam([p16], master_weights=True, stochastic_rounding=True)
    with pytest.raises(ValueError, match=r"kahan_summation=True applies to bfloat16 and float16 params; param 1 of param group 0 has dtype torch.float32"):
        fused_optim.SGD([p16, p32], lr=0.1, kahan_summation=True)
    opt = fused_optim.SGD([p16], lr=0.1, master_weights=True)
    with pytest.raises(ValueError, match=r"master_weights=True applies .* param 0 of param group 1 has dtype torch.float32"):
        opt.add_param_group({"params": [p32]})
    assert len(opt.param_groups) == 1
    # torch's own step cannot keep a mode: refused, not ignored; by the constructor where it
    # sees differentiable=True (it was accepted, and refused at the first step: found by a
    # review, 2026-12-06), else by the step
    with pytest.raises(RuntimeError, match=r"differentiable=True \(param group 0\), .* "
                                           "kahan_summation=True"):
        fused_optim.Adam([p16], lr=0.1, differentiable=True, kahan_summation=True)
    opt = fused_optim.Adam([p16], lr=0.1, kahan_summation=True)
    opt.param_groups[0]["differentiable"] = True
    p16.grad = torch.ones_like(p16)
    with pytest.raises(RuntimeError, match="differentiable=True.* kahan_summation=True"):
        opt.step()
    assert torch.equal(p16.detach(), torch.zeros(3, dtype=torch.bfloat16)) and not opt.state
    # the options' types (a string or None taken for a flag, True or a string for a norm,
    # a tensor of several elements: accepted before; found by a review, 2026-12-06)
    for kwargs, message in ((dict(kahan_summation="yes"), "kahan_summation must be True or False, got 'yes'"),
                            (dict(master_weights=None), "master_weights must be True or False, got None"),
                            (dict(stochastic_rounding=1), "stochastic_rounding must be True or False, got 1"),
                            (dict(max_grad_norm=True), "max_grad_norm must be a positive number or None, got True"),
                            (dict(max_grad_norm="1.0"), "max_grad_norm must be a positive number or None, got '1.0'"),
                            (dict(max_grad_norm=torch.ones(2)), "max_grad_norm must be a positive number or None"),
                            (dict(max_grad_norm=1.0, grad_norm_type="two"), "grad_norm_type must be a number, got 'two'")):
        with pytest.raises(TypeError, match=message):
            fused_optim.Adam([p16], lr=0.1, **kwargs)
    # numbers of every kind are taken as before, and 'inf' as torch's clip_grad_norm_ takes it
    for norm in (1, 0.5, torch.tensor(0.5)):
        assert fused_optim.Adam([p16], lr=0.1, max_grad_norm=norm,
                                grad_norm_type=float("inf")).max_grad_norm == float(norm)
    assert fused_optim.Adam([p16], lr=0.1, max_grad_norm=1.0,
                            grad_norm_type="inf").grad_norm_type == float("inf")


def test_state_dtype_checkpoint_keeps_scalar_states():
    # state_dtype alone (no mode): NAdam's mu_product keeps its float32 too, so a resumed
    # run is the uninterrupted one.
    kwargs = dict(lr=0.01, state_dtype=torch.float32)
    params = make_params(torch.bfloat16)
    opt = fused_optim.NAdam(params, **kwargs)
    for step in range(2):
        for p, g in zip(params, grads_at(step, torch.bfloat16)):
            p.grad = g
        opt.step()
    resumed = [p.detach().clone().requires_grad_() for p in params]
    opt2 = fused_optim.NAdam(resumed, **kwargs)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt2.state[resumed[0]]["mu_product"].dtype == torch.float32
    for step in range(2, 4):
        for ps, o in ((params, opt), (resumed, opt2)):
            for p, g in zip(ps, grads_at(step, torch.bfloat16)):
                p.grad = g
            o.step()
    for a, b in zip(params, resumed):
        assert_bitwise(a, b, "param")


@pytest.mark.parametrize("options", [{}, dict(kahan_summation=True), dict(master_weights=True),
                                     dict(state_dtype=torch.bfloat16)], ids=str)
def test_only_stochastic_rounding_draws_from_torchs_generator(options):
    # Its seed comes from torch's generator; no other option takes a number from it, so a
    # script's later random numbers are those it gets with torch.optim.
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    fused_optim.Adam([torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)], **options)
    assert torch.equal(torch.rand(3), expected)
    torch.manual_seed(0)
    fused_optim.Adam([torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)],
                     stochastic_rounding=True)
    assert not torch.equal(torch.rand(3), expected)
    # a construction refused by a later check draws nothing either
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        fused_optim.Adam([torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)],
                         stochastic_rounding=True, max_grad_norm=-1.0)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("key,value", [("kahan_summation", True), ("master_weights", True),
                                       ("stochastic_rounding", True),
                                       ("state_dtype", torch.uint8), ("max_grad_norm", 1.0),
                                       ("grad_norm_type", 1.0)])
def test_optimizer_options_in_a_param_group_are_refused(key, value):
    # Optimizer-wide options: a group that names one is refused (torch would keep the key
    # and nothing would apply it), in the constructor and in add_param_group.
    p16 = torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)
    q16 = torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(ValueError, match=f"'{key}' is an option of the optimizer, not of a param group"):
        fused_optim.Adam([{"params": [p16], key: value}])
    opt = fused_optim.Adam([p16])
    with pytest.raises(ValueError, match=f"'{key}' is an option of the optimizer"):
        opt.add_param_group({"params": [q16], key: value})
    assert len(opt.param_groups) == 1


def test_the_op_checks_its_storage_arguments():
    p = torch.zeros(4, dtype=torch.bfloat16)
    g = torch.ones(4, dtype=torch.bfloat16)
    sgd = torch.ops.fused_optim.sgd_
    common = dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                  maximize=False, is_first_step=False)
    with pytest.raises(RuntimeError, match="param_mode must be 0"):
        sgd([p], [g], [], **common, param_mode=7, param_aux=[])
    with pytest.raises(RuntimeError, match="kahan_summation needs one kahan_comp per param"):
        sgd([p], [g], [], **common, param_mode=1, param_aux=[])
    with pytest.raises(RuntimeError, match=r"master_param\[0\] has dtype BFloat16 but must be Float"):
        sgd([p], [g], [], **common, param_mode=3, param_aux=[torch.zeros(4, dtype=torch.bfloat16)])
    with pytest.raises(RuntimeError, match=r"rounding_state\) must be a contiguous int64 CPU tensor"):
        sgd([p], [g], [], **common, param_mode=2, param_aux=[torch.zeros(4, dtype=torch.int64)])
    with pytest.raises(RuntimeError, match="stochastic_rounding applies to bfloat16 and float16 params"):
        sgd([p.float()], [g.float()], [], **common, param_mode=2, param_aux=[torch.zeros(2, dtype=torch.int64)])
    assert torch.equal(p, torch.zeros(4, dtype=torch.bfloat16))


@pytest.mark.parametrize("mode", MODES)
def test_compiled_step_and_step_in_backward_match_eager(mode):
    """The modes through torch.compile (the op's param_aux list is a mutated argument the
    compiler sees) and through step_in_backward: the same bits as the eager step."""
    def model_and_opt(seed=0):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
        model = model.to(torch.bfloat16)
        return model, fused_optim.AdamW(model.parameters(), lr=0.01, **{mode: True})
    x = torch.randn(8, 16).to(torch.bfloat16)
    eager, eager_opt = model_and_opt()
    compiled, compiled_opt = model_and_opt()
    hooked, hooked_opt = model_and_opt()
    fused_optim.step_in_backward(hooked_opt)
    step = torch.compile(compiled_opt.step)
    for _ in range(3):
        for m in (eager, compiled):
            m.zero_grad()
            m(x).float().square().sum().backward()
        hooked(x).float().square().sum().backward()  # the updates run inside backward
        hooked_opt.step()  # (ends the iteration: the pending bucket)
        hooked_opt.zero_grad()
        eager_opt.step()
        step()
    for a, b, c in zip(eager.parameters(), compiled.parameters(), hooked.parameters()):
        assert_bitwise(b, a, "compiled")
        assert_bitwise(c, a, "step in backward")
        for k in eager_opt.state[a]:
            assert_bitwise(compiled_opt.state[b][k], eager_opt.state[a][k], f"compiled {k}")
            assert_bitwise(hooked_opt.state[c][k], eager_opt.state[a][k], f"in backward {k}")


@pytest.mark.parametrize("copy_of", [copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))],
                         ids=["deepcopy", "pickle"])
def test_copies_keep_the_mode(copy_of):
    """A copied or unpickled optimizer keeps its mode (and max_grad_norm): torch's
    __getstate__ alone keeps only defaults, state and param_groups, and the copy would then
    step rounding to nearest, its kahan_comp ignored."""
    params, opt, _ = run_ours("AdamW", dict(lr=0.01), "kahan_summation", torch.bfloat16, steps=1)
    opt.max_grad_norm = 1.0
    twin = copy_of(opt)
    assert twin._param_mode == opt._param_mode and twin.max_grad_norm == 1.0
    for p, q in zip(params, [p for g in twin.param_groups for p in g["params"]]):
        p.grad = q.grad = torch.full_like(p, 0.5)
    opt.step()
    twin.step()
    for p, q in zip(params, [p for g in twin.param_groups for p in g["params"]]):
        assert_bitwise(q, p, "param")
        assert_bitwise(twin.state[q]["kahan_comp"], opt.state[p]["kahan_comp"], "kahan_comp")


@pytest.mark.parametrize("option", ["master_weights", "stochastic_rounding"])
def test_a_mode_checkpoint_cast_by_torchs_load_is_refused_when_loaded(option):
    """A mode's checkpoint loaded into torch.optim without to_torch_state_dict has its
    master weights and rounding state cast to the params' dtype (bfloat16): loaded back,
    it was taken, and the first step raised (the seed already lost). Now load_state_dict
    refuses it, naming what happened, before anything is loaded (found by a review,
    2026-12-06)."""
    g = torch.Generator().manual_seed(0)
    p = torch.randn(8, generator=g).to(torch.bfloat16).requires_grad_()
    opt = fused_optim.AdamW([p], lr=0.1, **{option: True})
    p.grad = torch.randn(8, generator=g).to(torch.bfloat16)
    opt.step()
    torch_opt = torch.optim.AdamW([p], lr=0.1)
    torch_opt.load_state_dict(opt.state_dict())
    key = "master_param" if option == "master_weights" else "rounding_state"
    assert torch_opt.state[p][key].dtype == torch.bfloat16  # (what torch's load does)
    fresh = fused_optim.AdamW([p], lr=0.1, **{option: True})
    with pytest.raises(ValueError, match=rf"state '{key}' of param 0 has dtype torch.bfloat16 .*"
                                         rf"{option}=True keeps .* without "
                                         "fused_optim.to_torch_state_dict"):
        fresh.load_state_dict(torch_opt.state_dict())
    assert not fresh.state
    fresh.load_state_dict(opt.state_dict())  # (the checkpoint itself loads)
    assert torch.equal(fresh.state[p][key], opt.state[p][key])
