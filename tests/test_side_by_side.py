"""Note [small states side by side] (fused_optim/optimizer.py): the state tensors of small
CPU params lie side by side, one allocation per key (the zero ones made there, the others
copied there), each with a storage of its own, and nothing a user can see changes but the
addresses."""
import io
import random

import pytest
import torch

import fused_optim
import parity_utils as pu
from fused_optim.optimizer import _SIDE_BY_SIDE_MAX

# The options that make the most state entries shaped like the param.
OPTIONS = {
    "SGD": dict(lr=0.1, momentum=0.9),
    "Adam": dict(lr=0.01, amsgrad=True),
    "AdamW": dict(lr=0.01, weight_decay=0.1),
    "RMSprop": dict(lr=0.01, momentum=0.9, centered=True),
    "Adagrad": dict(lr=0.1, initial_accumulator_value=0.1),
    "Adamax": dict(lr=0.01),
    "Adadelta": dict(lr=0.5),
    "NAdam": dict(lr=0.01),
    "RAdam": dict(lr=0.01),
    "Rprop": dict(lr=0.01),
    "ASGD": dict(lr=0.01, t0=1),
}


def small_params(count=40, dtype=torch.float32, seed=0):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(rng.randint(1, 3000), generator=gen).to(dtype))
          for _ in range(count)]
    ps.append(torch.nn.Parameter(torch.randn(7, 5, generator=gen).to(dtype)))  # 2-D
    return ps


def set_grads(ps, step):
    gen = torch.Generator().manual_seed(1000 + step)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


def side_by_side_keys(opt, ps):
    """The state keys whose tensors lie one after the other, in the params' order, each
    starting on a 64-byte line at most 72 bytes after the one before (Note [copies side
    by side] in csrc/cpu/adjacent.cpp), each with its own storage."""
    keys = []
    for key, v in opt.state[ps[0]].items():
        if not isinstance(v, torch.Tensor) or v.shape != ps[0].shape:
            continue
        ts = [opt.state[p][key] for p in ps]
        for t in ts:
            # (a storage of its own: torch.save writes the tensor's bytes, not a region's)
            assert t.untyped_storage().nbytes() == t.nbytes, key
            assert t.untyped_storage().data_ptr() == t.data_ptr(), key
            assert t.is_contiguous(), key
        ends = [(t.data_ptr() + t.nbytes + 8 + 63) // 64 * 64 for t in ts]
        if all(ts[i + 1].data_ptr() == ends[i] for i in range(len(ts) - 1)):
            keys.append(key)
    return keys


def spy_side_by_side(monkeypatch):
    """The calls of fused_optim::_side_by_side from now on: (number of tensors, copy)."""
    calls = []
    real = torch.ops.fused_optim._side_by_side

    def spy(like, copy):
        calls.append((len(like), copy))
        return real(like, copy)

    monkeypatch.setattr(torch.ops.fused_optim, "_side_by_side", spy)
    return calls


def without_side_by_side(cls):
    """An optimizer class whose states stay where torch's code makes them."""
    from fused_optim.optimizer import _StateArena
    return type(cls.__name__, (cls,), {"_side_by_side": lambda self, params, skip=(): None,
                                       "_state_arena": lambda self, params: _StateArena([])})


def assert_placed_and_same_bits(cls, dtype=torch.float32, steps=4, **kwargs):
    """Trains `cls` twice on the same params and grads, with its states side by side and
    with them where torch's code makes them: every state entry shaped like the param, and
    no other, lies side by side; every param and state element, key, dtype and stride is
    the same."""
    ps, qs = small_params(dtype=dtype), small_params(dtype=dtype)
    ours = cls(ps, **kwargs)
    plain = without_side_by_side(cls)(qs, **kwargs)
    for step in range(steps):
        set_grads(ps, step)
        set_grads(qs, step)
        ours.step()
        plain.step()
    shaped = sorted(k for k, v in plain.state[qs[0]].items() if v.shape == qs[0].shape)
    assert shaped and sorted(side_by_side_keys(ours, ps)) == shaped
    assert side_by_side_keys(plain, qs) == []
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)
        assert ours.state[p].keys() == plain.state[q].keys()
        for k, v in plain.state[q].items():
            w = ours.state[p][k]
            assert (w.dtype, w.shape, w.stride()) == (v.dtype, v.shape, v.stride()), k
            assert torch.equal(w, v), k
    return shaped


@pytest.mark.parametrize("name", list(OPTIONS))
def test_new_state_lies_side_by_side_and_changes_no_bit(name):
    assert_placed_and_same_bits(pu.ALGOS[name][1], **OPTIONS[name])


def test_parity_with_torch_for_loop_side_by_side():
    """The moved states train as torch's for-loop does (IEEE sqrt), bit for bit."""
    ps = small_params()
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    ours = fused_optim.Adam(ps, lr=0.01)
    ref = torch.optim.Adam(qs, lr=0.01, foreach=False)
    with pu.correctly_rounded_sqrt():  # torch's for-loop made exact (see parity_utils)
        for step in range(5):
            set_grads(ps, step)
            set_grads(qs, step)
            ours.step()
            ref.step()
    assert side_by_side_keys(ours, ps) == ["exp_avg", "exp_avg_sq"]
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(ours.state[p][k], ref.state[q][k]), k


@pytest.mark.parametrize("kw", [dict(master_weights=True), dict(kahan_summation=True),
                                dict(state_dtype=torch.bfloat16)],
                         ids=["master_weights", "kahan_summation", "state_dtype"])
def test_storage_modes_and_state_dtype_buffers_side_by_side(kw):
    """Master weights (float32, shaped like the bfloat16 param), Kahan's compensations and
    bfloat16 moments move too (copied after the first update), and the training is the same
    bits as with them where they were made."""
    shaped = assert_placed_and_same_bits(fused_optim.AdamW, torch.bfloat16, 3, lr=0.01, **kw)
    assert len(shaped) >= 2


@pytest.mark.parametrize("name", ["Adam", "SGD", "RMSprop"])
def test_zero_states_are_made_side_by_side_not_copied(name, monkeypatch):
    """The zero states of a step's new params are made side by side (one allocation per
    key, no copy, so no second set of them even for a moment): the copy after the update
    has nothing left to do."""
    calls = spy_side_by_side(monkeypatch)
    ps = small_params()
    opt = pu.ALGOS[name][1](ps, **OPTIONS[name])
    set_grads(ps, 0)
    opt.step()
    keys = side_by_side_keys(opt, ps)
    assert keys and calls == [(len(ps), False)] * len(keys)


def test_what_stays_where_it_was_made():
    """A param over the size limit, a non-contiguous one (its state has its strides) and
    a group of one keep the state torch's code makes."""
    big = torch.nn.Parameter(torch.randn(_SIDE_BY_SIDE_MAX + 1))
    transposed = torch.nn.Parameter(torch.randn(30, 20).t())
    ps = small_params(10)
    opt = fused_optim.Adam(ps[:5] + [big, transposed] + ps[5:], lr=0.01)
    set_grads(ps + [big, transposed], 0)
    opt.step()
    assert side_by_side_keys(opt, ps) == ["exp_avg", "exp_avg_sq"]
    region = [opt.state[p]["exp_avg"] for p in ps]
    lo, hi = region[0].data_ptr(), region[-1].data_ptr() + region[-1].nbytes
    for p in (big, transposed):
        t = opt.state[p]["exp_avg"]
        assert t.stride() == p.stride()
        assert not lo <= t.data_ptr() < hi
    one = torch.nn.Parameter(torch.randn(100))
    single = fused_optim.Adam([one], lr=0.01)
    one.grad = torch.randn(100)
    single.step()
    assert single.state[one]["exp_avg"].untyped_storage().nbytes() == 400


def test_saving_one_state_tensor_saves_its_bytes_only():
    ps = small_params()
    opt = fused_optim.Adam(ps, lr=0.01)
    set_grads(ps, 0)
    opt.step()
    t = opt.state[ps[3]]["exp_avg"]
    buf = io.BytesIO()
    torch.save(t, buf)
    assert buf.tell() < t.nbytes + 2048  # (the zip container's own bytes, under 2 KB)
    buf.seek(0)
    assert torch.equal(torch.load(buf), t)


def test_load_state_dict_keeps_the_state_dicts_own_tensors_as_torch_does():
    """torch.optim's state after load_state_dict is the state_dict's own tensors (where no
    cast is needed): shared memory stays shared, and load hooks see the final tensors.
    Ours too: nothing is moved on load. Training continues bit for bit as torch's own."""
    ps = small_params()
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    ref = torch.optim.RMSprop(qs, lr=0.01, momentum=0.9, centered=True, foreach=False)
    with pu.correctly_rounded_sqrt():
        set_grads(qs, 0)
        ref.step()
        with torch.no_grad():
            for p, q in zip(ps, qs):
                p.copy_(q)
        buf = io.BytesIO()
        torch.save(ref.state_dict(), buf)
        buf.seek(0)
        loaded = torch.load(buf)
        for s in loaded["state"].values():
            s["square_avg"].share_memory_()
        ours = fused_optim.RMSprop(ps, lr=0.01, momentum=0.9, centered=True)
        ours.load_state_dict(loaded)
        for i, p in enumerate(ps):
            for k in ("square_avg", "grad_avg", "momentum_buffer"):
                assert ours.state[p][k] is loaded["state"][i][k], k
            assert ours.state[p]["square_avg"].is_shared()
        for step in range(1, 4):
            set_grads(ps, step)
            set_grads(qs, step)
            ours.step()
            ref.step()
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)
        for k, v in ref.state[q].items():
            assert torch.equal(ours.state[p][k], v), k


def test_adagrad_sums_made_at_construction_side_by_side():
    ps = small_params()
    opt = fused_optim.Adagrad(ps, lr=0.1, initial_accumulator_value=0.25)
    assert side_by_side_keys(opt, ps) == ["sum"]
    for p in ps:
        assert torch.equal(opt.state[p]["sum"], torch.full_like(p, 0.25))


def test_step_in_backward_places_each_buckets_new_state_side_by_side(monkeypatch):
    """Step in backward makes state a bucket at a time, during backward: each bucket's new
    zero states are made side by side, and the training is the same bits as
    backward-then-step."""
    calls = spy_side_by_side(monkeypatch)

    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(12)])

    ours, ref = make(), make()
    opt = fused_optim.Adam(ours.parameters(), lr=0.01)
    ref_opt = fused_optim.Adam(ref.parameters(), lr=0.01)
    x = torch.randn(4, 64)
    # (buckets of about three layers' grads: 16.6 KB a layer)
    with fused_optim.step_in_backward(opt, bucket_cap_mb=0.045):
        for it in range(3):
            ours(x).square().sum().backward()
            if it == 0:
                # the buckets' calls during backward, two keys each, none a copy
                assert len(calls) >= 6 and not any(copy for _, copy in calls)
                assert sum(n for n, _ in calls) >= len(list(ours.parameters()))
            opt.step()
            opt.zero_grad()
            ref(x).square().sum().backward()
            ref_opt.step()
            ref_opt.zero_grad()
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(p, q)
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][k], ref_opt.state[q][k]), k


def test_sgd_buffer_of_a_grad_laid_out_unlike_its_param_has_torchs_strides():
    """torch's SGD makes momentum_buffer as a clone of the grad, with the grad's strides,
    also on a size-1 dimension where a contiguous param's differ: that buffer is made as
    torch makes it, the others side by side."""
    ps = small_params(10) + [torch.nn.Parameter(torch.randn(1, 5))]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    ours = fused_optim.SGD(ps, lr=0.1, momentum=0.9)
    ref = torch.optim.SGD(qs, lr=0.1, momentum=0.9, foreach=False)
    set_grads(ps, 0)
    odd = torch.randn(5, 1).t()  # shape (1, 5), strides (1, 1): contiguous, unlike (5, 1)
    ps[-1].grad = odd.clone().t().contiguous().t()  # the same layout, its own memory
    for p, q in zip(ps, qs):
        q.grad = p.grad.clone()
    assert ps[-1].grad.stride() == (1, 1) != ps[-1].stride()
    ours.step()
    ref.step()
    assert side_by_side_keys(ours, ps[:-1]) == ["momentum_buffer"]
    for p, q in zip(ps, qs):
        v, w = ref.state[q]["momentum_buffer"], ours.state[p]["momentum_buffer"]
        assert w.stride() == v.stride() and torch.equal(w, v)
        assert torch.equal(p, q)
