"""Checkpoints move between torch.optim and fused_optim in both directions."""
import inspect
import io

import pytest
import torch

import parity_utils as pu

OPTS = {"SGD": dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
        "Adam": dict(lr=0.01, amsgrad=True, weight_decay=0.1),
        "AdamW": dict(lr=torch.tensor(0.01), amsgrad=False),
        "RMSprop": dict(lr=0.01, momentum=0.9, centered=True, weight_decay=0.01),
        "Adagrad": dict(lr=torch.tensor(0.05), lr_decay=0.01, initial_accumulator_value=0.1),
        "Adamax": dict(lr=0.01, weight_decay=0.1),
        "Adadelta": dict(lr=torch.tensor(0.5), rho=0.8, weight_decay=0.01),
        "NAdam": dict(lr=torch.tensor(0.01), weight_decay=0.1, decoupled_weight_decay=True),
        "RAdam": dict(lr=0.01, weight_decay=0.1),
        "Rprop": dict(lr=torch.tensor(0.01), etas=(0.4, 1.3)),
        "ASGD": dict(lr=torch.tensor(0.01), lambd=0.1, t0=2.0, weight_decay=0.01),
        # A Python float lr: torch's for-loop writes eta and mu from torch.as_tensor(a
        # Python float), float32, into the float64 tensors a float64 param's load leaves
        "ASGD/float lr": dict(lr=0.01, lambd=0.1, t0=1.0)}


def model_params(dtype):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_()
            for s in [(7, 9), (13,), (1,), (2, 3, 4)]]


def train(opt, ps, steps, start):
    for step in range(start, start + steps):
        g = torch.Generator().manual_seed(step)
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
        opt.step()


def roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def as_loaded(sd, dtype):
    """A checkpoint as load_state_dict leaves it for params of `dtype`: every floating state
    but `step` cast to it (NAdam's float32 mu_product too, in torch.optim as here)."""
    state = {k: {key: v if key == "step" or not v.is_floating_point() else v.to(dtype)
                 for key, v in s.items()} for k, s in sd["state"].items()}
    return dict(sd, state=state)


def assert_same_state_dict(a, b):
    # The torch side is built with foreach=False (to force its for-loop): that flag aside,
    # the groups must be identical.
    strip = lambda groups: [{k: v for k, v in g.items() if k != "foreach"} for g in groups]  # noqa: E731
    assert strip(a["param_groups"]) == strip(b["param_groups"])
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert a["state"][k].keys() == b["state"][k].keys()
        for key, v in a["state"][k].items():
            w = b["state"][k][key]
            assert v.dtype == w.dtype and v.shape == w.shape and v.device == w.device, key
            assert torch.equal(v, w), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", list(OPTS))
@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
def test_checkpoint_interchange_continues_identically(name, direction, dtype):
    torch_cls, ours_cls = pu.ALGOS[name.split("/")[0]]
    first, second = (torch_cls, ours_cls) if direction == "torch_to_ours" else (ours_cls, torch_cls)
    kw = lambda cls: dict(OPTS[name], foreach=False) if cls is torch_cls else dict(OPTS[name])  # noqa: E731
    with pu.correctly_rounded_sqrt():  # torch's for-loop made exact (see parity_utils)
        # Reference: the second class all the way, through a checkpoint of its own (loading
        # casts some state: as_loaded).
        ref_ps = model_params(dtype)
        ref = second(ref_ps, **kw(second))
        train(ref, ref_ps, 3, 0)
        ref_sd = roundtrip(ref.state_dict())
        ref = second(ref_ps, **kw(second))
        ref.load_state_dict(ref_sd)
        train(ref, ref_ps, 3, 3)
        # Three steps with the first class, checkpoint, three with the second.
        ps = model_params(dtype)
        opt = first(ps, **kw(first))
        train(opt, ps, 3, 0)
        ref_after3_ps = model_params(dtype)
        ref3 = second(ref_after3_ps, **kw(second))
        train(ref3, ref_after3_ps, 3, 0)
        sd = roundtrip(opt.state_dict())
        if dtype != torch.bfloat16:  # bf16: the two differ by design (see the parity suite)
            assert_same_state_dict(sd, ref3.state_dict())
        ps2 = [p.detach().clone().requires_grad_() for p in ps]
        opt2 = second(ps2, **kw(second))
        opt2.load_state_dict(sd)
        assert_same_state_dict(opt2.state_dict(), as_loaded(sd, dtype))
        train(opt2, ps2, 3, 3)
    if dtype == torch.bfloat16:
        # torch's bf16 for-loop rounds every intermediate; ours does not. Continuing works
        # and stays close (bf16: a few ulps over 3 steps).
        for p, q in zip(ps2, ref_ps):
            torch.testing.assert_close(p, q, rtol=0.05, atol=0.05)
        return
    for p, q in zip(ps2, ref_ps):
        assert torch.equal(p, q)
    assert_same_state_dict(opt2.state_dict(), ref.state_dict())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(OPTS))
def test_after_loading_the_same_checkpoint_ours_continues_as_torchs(name, dtype):
    # One torch.optim checkpoint, loaded into torch.optim and into fused_optim: both go on
    # with the state as the load left it (cast to the param's dtype), step for step alike.
    torch_cls, ours_cls = pu.ALGOS[name.split("/")[0]]
    with pu.correctly_rounded_sqrt():
        ps = model_params(dtype)
        src = torch_cls(ps, **dict(OPTS[name], foreach=False))
        train(src, ps, 2, 0)
        sd = roundtrip(src.state_dict())
        runs = []
        for cls, kw in ((torch_cls, dict(OPTS[name], foreach=False)), (ours_cls, OPTS[name])):
            qs = [p.detach().clone().requires_grad_() for p in ps]
            opt = cls(qs, **kw)
            opt.load_state_dict(roundtrip(sd))  # (a load may keep the checkpoint's tensors)
            train(opt, qs, 3, 2)
            runs.append((qs, opt))
    (tq, topt), (oq, oopt) = runs
    for p, q in zip(tq, oq):
        assert torch.equal(p, q)
    assert_same_state_dict(oopt.state_dict(), topt.state_dict())


# Steps big enough that one ulp of a 16-bit 0-dim state's coefficient shows in the params.
SCALAR_STATE_OPTS = {"NAdam/lr 1": dict(lr=1.0), "ASGD/lr 1": dict(lr=1.0, lambd=0.5, t0=1.0)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(OPTS) + list(SCALAR_STATE_OPTS))
def test_torch_checkpoint_loaded_into_16_bit_params_continues_as_the_rounded_reference(name, dtype):
    """A float32 torch.optim checkpoint loaded into 16-bit params: load_state_dict casts every
    floating state but `step` to the params' dtype (NAdam's mu_product and ASGD's eta and mu
    too, 0-dim tensors that torch's for-loop then updates in that dtype). The steps after it
    are the 16-bit reference's (parity_utils.run_rounded_reference: torch's for-loop in
    float32 on float32 copies, params and moments rounded to 16 bits after each step) started
    from the loaded state, with the 0-dim states left in 16 bits as torch leaves them: the
    same bits, params and state."""
    torch_cls, ours_cls = pu.ALGOS[name.split("/")[0]]
    opts = {**OPTS, **SCALAR_STATE_OPTS}[name]
    with pu.correctly_rounded_sqrt():
        src_ps = model_params(torch.float32)
        src = torch_cls(src_ps, **dict(opts, foreach=False))
        train(src, src_ps, 2, 0)
        sd = roundtrip(src.state_dict())
        low = [p.detach().to(dtype).requires_grad_() for p in src_ps]
        ours = ours_cls(low, **opts)
        ours.load_state_dict(roundtrip(sd))
        train(ours, low, 3, 2)
        # The reference, from the state as the load into 16-bit params left it.
        work = [p.detach().to(dtype).float().requires_grad_() for p in src_ps]
        ref = torch_cls(work, **dict(opts, foreach=False))
        ref.load_state_dict(roundtrip(sd))
        for p, s in zip(work, as_loaded(sd, dtype)["state"].values()):
            ref.state[p] = {k: v if k in pu.SCALAR_STATES else v.float() for k, v in s.items()}
        for step in range(2, 5):
            g = torch.Generator().manual_seed(step)
            for p in work:  # train()'s grads, rounded to 16 bits as ours get them
                p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype).float()
            ref.step()
            with torch.no_grad():
                for p in work:
                    p.copy_(p.to(dtype))
                    for k, v in ref.state[p].items():
                        if k not in pu.SCALAR_STATES:
                            v.copy_(v.to(dtype))
    for p, q in zip(low, work):
        assert torch.equal(p, q.to(dtype))
        assert ours.state[p].keys() == ref.state[q].keys()
        for k, v in ref.state[q].items():
            want = v if k in pu.SCALAR_STATES else v.to(dtype)
            assert ours.state[p][k].dtype == want.dtype and torch.equal(ours.state[p][k], want), k


@pytest.mark.parametrize("name", list(OPTS))
def test_fresh_state_matches_torch_keys_dtypes_layouts(name):
    torch_cls, ours_cls = pu.ALGOS[name.split("/")[0]]
    # torch.optim.RMSprop has no fused implementation (nor the argument)
    for fused in (None, True) if "fused" in inspect.signature(torch_cls).parameters else (None,):
        for default in (torch.float32, torch.float64):
            old = torch.get_default_dtype()
            torch.set_default_dtype(default)
            try:
                ps = [torch.randn(4, 6).t().requires_grad_(),
                      torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last).requires_grad_()]
                qs = [p.detach().clone().requires_grad_() for p in ps]
                for p, q in zip(ps, qs):
                    p.grad = torch.randn_like(p)
                    q.grad = p.grad.clone()
                kw = dict(OPTS[name], fused=fused) if fused else OPTS[name]
                ours = ours_cls(ps, **kw)
                ref = torch_cls(qs, **kw)
                ours.step()
                ref.step()
                for p, q in zip(ps, qs):
                    for k, v in ref.state[q].items():
                        w = ours.state[p][k]
                        assert (w.dtype, w.shape, w.stride(), w.device) == (v.dtype, v.shape, v.stride(), v.device), k
                    assert ours.state[p].keys() == ref.state[q].keys()
            finally:
                torch.set_default_dtype(old)


@pytest.mark.parametrize("name", ["Adam", "AdamW", "RMSprop", "Adagrad", "Adamax",
                                  "Adadelta", "NAdam", "RAdam", "Rprop", "ASGD"])  # SGD keeps no step
def test_old_checkpoint_with_python_number_step_loads(name):
    """Old checkpoints stored `step` as a number; torch's __setstate__ converts it."""
    torch_cls, ours_cls = pu.ALGOS[name.split("/")[0]]
    ps = model_params(torch.float32)
    opt = ours_cls(ps, **OPTS[name])
    train(opt, ps, 2, 0)
    sd = opt.state_dict()
    for s in sd["state"].values():
        s["step"] = 2.0
    opt2 = ours_cls(ps, **OPTS[name])
    opt2.load_state_dict(sd)
    train(opt2, ps, 1, 2)
    assert all(opt2.state[p]["step"].item() == 3.0 for p in ps)


@pytest.mark.parametrize("extra", [dict(state_dtype=torch.bfloat16), dict(state_dtype=torch.uint8),
                                   dict(kahan_summation=True)], ids=str)
def test_state_of_an_id_in_no_group_loads_as_torchs_keeps_it(extra):
    """torch's load keeps the state of an id that no param group names, as it is; with a
    state_dtype or a storage mode ours raised KeyError half way through the load (found by a
    review, 2026-12-05)."""
    import fused_optim
    dtype = torch.bfloat16 if "kahan_summation" in extra else torch.float32
    p = torch.nn.Parameter(torch.ones(8, dtype=dtype))
    opt = fused_optim.Adam([p], lr=0.1, **extra)
    p.grad = torch.ones_like(p)
    opt.step()
    sd = opt.state_dict()
    orphan = {"step": torch.tensor(1.0), "exp_avg": torch.ones(2), "exp_avg_sq": torch.ones(2)}
    sd["state"][7] = orphan
    sd["param_groups"][0]["lr"] = 0.5
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.5
    assert opt.state[7] is orphan
    p.grad = torch.ones_like(p)
    opt.step()  # (the orphan is not a param: the step leaves it)
    assert opt.state[7] is orphan and torch.equal(orphan["exp_avg"], torch.ones(2))
