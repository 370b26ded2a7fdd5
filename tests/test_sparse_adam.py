"""fused_optim.SparseAdam against torch.optim.SparseAdam: every element of every param and
state tensor, bitwise (float32/float64 with torch's for-loop on the IEEE sqrt; bfloat16 and
float16 as torch computes them op by op), over several steps of uncoalesced sparse grads
with repeated indices, for every option and layout; checkpoints both ways; GradScaler; the
errors (Note [sparse adam] in csrc/update_rules.h)."""
import copy

import pytest
import torch

import fused_optim
from parity_utils import correctly_rounded_sqrt

# name -> (shape, sparse_dim, transposed)
LAYOUTS = {
    "embedding": ((40, 7), 1, False),        # nn.Embedding(sparse=True)'s grads
    "vector": ((33,), 1, False),             # one element per entry
    "rows_3d": ((9, 4, 5), 1, False),        # a dense part of 2 dims
    "cells_3d": ((6, 5, 3), 2, False),       # 2 sparse dims
    "all_sparse": ((8, 6), 2, False),        # no dense part
    "transposed": ((7, 12), 1, True),        # a param whose rows are not contiguous
    "wide_row": ((5, 300), 1, False),        # rows longer than a vector
}
OPTIONS = [
    dict(lr=1e-2),
    dict(lr=0.1, betas=(0.8, 0.99), eps=1e-6),
    dict(lr=1e-2, maximize=True),
    dict(lr=torch.tensor(0.05)),
    # eps near the square roots: on 16-bit params torch's `.add_(eps)` rounds eps to their
    # dtype first (0.1 is 0.10009765625 in bfloat16), which shows in the params' last bits
    dict(lr=1e-2, eps=0.1),
]


def make_params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = {}
    for name, (shape, _, transposed) in LAYOUTS.items():
        if transposed:
            p = torch.randn(tuple(reversed(shape)), generator=g, dtype=torch.float64).to(dtype).t()
        else:
            p = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        params[name] = p.requires_grad_()
    return params


def sparse_grad(shape, sparse_dim, dtype, step, k, empty=False):
    """An uncoalesced sparse grad: random entries, some indices repeated."""
    g = torch.Generator().manual_seed(1000 * step + k)
    nnz = 0 if empty else 2 + (step + k) % 7
    idx = torch.stack([torch.randint(0, shape[d], (nnz,), generator=g) for d in range(sparse_dim)])
    if nnz > 2:
        idx[:, -1] = idx[:, 0]  # a repeated index: coalescing sums them
    values = torch.randn((nnz,) + tuple(shape[sparse_dim:]), generator=g, dtype=torch.float64)
    return torch.sparse_coo_tensor(idx, values.to(dtype), shape)


def set_grads(params, dtype, step):
    for k, (name, p) in enumerate(params.items()):
        shape, sparse_dim, _ = LAYOUTS[name]
        # an empty grad now and then: torch counts the step and changes nothing else
        p.grad = sparse_grad(shape, sparse_dim, dtype, step, k, empty=(step == 2 and k == 1))


def build(cls, params, options):
    names = list(params)
    return cls([{"params": [params[n] for n in names[:3]]},
                {"params": [params[n] for n in names[3:]]}], **copy.deepcopy(options))


def assert_same(ours, ref):
    (po, oo), (pr, orf) = ours, ref
    for name in po:
        assert torch.equal(po[name].detach(), pr[name].detach()), f"param {name}"
        so, sr = oo.state.get(po[name], {}), orf.state.get(pr[name], {})
        assert so.keys() == sr.keys(), name
        for key in sr:
            if key == "step":
                assert so[key] == sr[key] and type(so[key]) is type(sr[key]), name
            else:
                assert so[key].dtype == sr[key].dtype and so[key].stride() == sr[key].stride()
                assert torch.equal(so[key], sr[key]), f"state {name}.{key}"


def run(cls, options, dtype, steps=5, params=None, opt=None, first=0):
    params = params if params is not None else make_params(dtype)
    opt = opt if opt is not None else build(cls, params, options)
    for step in range(first, first + steps):
        set_grads(params, dtype, step)
        opt.step()
    return params, opt


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_bitwise_torch_sparse_adam(options, dtype, threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours = run(fused_optim.SparseAdam, options, dtype)
        with correctly_rounded_sqrt():
            ref = run(torch.optim.SparseAdam, options, dtype)
    finally:
        torch.set_num_threads(old)
    assert_same(ours, ref)


@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
def test_checkpoints_both_ways(direction):
    classes = (torch.optim.SparseAdam, fused_optim.SparseAdam)
    first, second = classes if direction == "torch_to_ours" else classes[::-1]
    with correctly_rounded_sqrt():
        params, opt = run(first, OPTIONS[1], torch.float32, steps=3)
        saved = copy.deepcopy(opt.state_dict())
        params2 = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
        opt2 = build(second, params2, OPTIONS[1])
        opt2.load_state_dict(saved)
        cont = run(second, OPTIONS[1], torch.float32, steps=3, params=params2, opt=opt2, first=3)
        both = run(first, OPTIONS[1], torch.float32, steps=3, params=params, opt=opt, first=3)
    assert_same(cont, both)


@pytest.mark.parametrize("handoff", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("init_scale", [2.0**10, 1000.0])
def test_grad_scaler(init_scale, dtype, handoff):
    # With the handoff (Note [GradScaler's handoff]), GradScaler hands our step
    # grad_scale/found_inf; torch's SparseAdam gets grads it unscaled itself (as ours does
    # without it). Step 2 has an inf: skipped whole (no step counted) by both. A scale
    # that is not a power of two rounds the unscaled grads: bfloat16 ones are unscaled in
    # float, as GradScaler does (not by a scalar rounded to bfloat16 first).
    runs = []
    for cls in (fused_optim.SparseAdam, torch.optim.SparseAdam):
        params = make_params(dtype)
        opt = build(cls, params, OPTIONS[0])
        if handoff and cls is fused_optim.SparseAdam:
            opt._step_supports_amp_scaling = True
        scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        with correctly_rounded_sqrt():
            for step in range(4):
                scaler.scale(torch.ones(()))
                set_grads(params, dtype, step)
                for p in params.values():
                    p.grad = p.grad * scaler.get_scale()
                    if step == 2 and p.grad._values().numel() > 0:
                        p.grad._values().view(-1)[0] = float("inf")
                scaler.step(opt)
                scaler.update()
        runs.append((params, opt))
    assert_same(*runs)
    assert runs[0][1].state[runs[0][0]["embedding"]]["step"] == 3


def test_dense_grad_error_changes_nothing():
    params = make_params(torch.float32)
    opt = build(fused_optim.SparseAdam, params, OPTIONS[0])
    set_grads(params, torch.float32, 0)
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    values = {n: p.detach().clone() for n, p in params.items()}
    set_grads(params, torch.float32, 1)
    params["rows_3d"].grad = torch.ones(LAYOUTS["rows_3d"][0])  # a dense grad, third param
    with pytest.raises(RuntimeError, match="SparseAdam does not support dense gradients, please consider Adam instead"):
        opt.step()
    # torch would have counted and updated the params before it; here nothing changed.
    after = opt.state_dict()
    for k, s in before["state"].items():
        assert s["step"] == after["state"][k]["step"]
        assert torch.equal(s["exp_avg"], after["state"][k]["exp_avg"])
    for n, p in params.items():
        assert torch.equal(p.detach(), values[n])


def test_constructor_errors_are_torch():
    for bad, msg in ((dict(lr=-1.0), "Invalid learning rate"), (dict(eps=0.0), "Invalid epsilon"),
                     (dict(betas=(1.0, 0.9)), "Invalid beta parameter at index 0"),
                     (dict(betas=(0.9, 1.5)), "Invalid beta parameter at index 1")):
        with pytest.raises(ValueError, match=msg):
            fused_optim.SparseAdam([torch.zeros(3, requires_grad=True)], **bad)
    with pytest.raises(ValueError, match="SparseAdam requires dense parameter tensors"):
        fused_optim.SparseAdam([torch.zeros(3).to_sparse().requires_grad_()])
    with pytest.raises(ValueError, match="SparseAdam does not support max_grad_norm"):
        fused_optim.SparseAdam([torch.zeros(3, requires_grad=True)], max_grad_norm=1.0)
    with pytest.raises(ValueError, match="SparseAdam does not support complex parameters"):
        fused_optim.SparseAdam([torch.zeros(3, dtype=torch.complex64, requires_grad=True)])


def test_out_of_bounds_index_is_an_error_before_any_change():
    p = torch.zeros(5, 3, requires_grad=True)
    q = torch.zeros(4, requires_grad=True)
    opt = fused_optim.SparseAdam([q, p])
    q.grad = torch.sparse_coo_tensor(torch.tensor([[1]]), torch.ones(1), (4,))
    p.grad = torch.sparse_coo_tensor(torch.tensor([[7]]), torch.ones(1, 3), (5, 3), check_invariants=False)
    with pytest.raises(RuntimeError, match="out of bounds for dimension 0 of size 5"):
        opt.step()
    assert torch.equal(q.detach(), torch.zeros(4))


def test_a_failing_step_counts_no_step():
    """The kernel's checks fail (an index out of bounds, second param): no param, moment or
    count changes (the counts were incremented before the kernel ran)."""
    p = torch.zeros(5, 3, requires_grad=True)
    q = torch.zeros(4, requires_grad=True)
    opt = fused_optim.SparseAdam([q, p])

    def grads(row):
        q.grad = torch.sparse_coo_tensor(torch.tensor([[1]]), torch.ones(1), (4,))
        p.grad = torch.sparse_coo_tensor(torch.tensor([[row]]), torch.ones(1, 3), (5, 3),
                                         check_invariants=False)
    grads(2)
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    values = [q.detach().clone(), p.detach().clone()]
    grads(7)
    with pytest.raises(RuntimeError, match="out of bounds for dimension 0 of size 5"):
        opt.step()
    after = opt.state_dict()
    for k, s in before["state"].items():
        assert after["state"][k]["step"] == s["step"] == 1
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(after["state"][k][key], s[key])
    assert torch.equal(q.detach(), values[0]) and torch.equal(p.detach(), values[1])


def test_a_param_listed_twice_counts_twice_as_torchs():
    """torch's loop counts a param listed twice twice (the second entry's step size from
    the second count): the same bits and count."""
    out = []
    for cls in (torch.optim.SparseAdam, fused_optim.SparseAdam):
        p = torch.zeros(6, 2, requires_grad=True)
        with pytest.warns(UserWarning, match="duplicate parameters"):
            opt = cls([p, p], lr=0.1)
        for step in range(3):
            p.grad = torch.sparse_coo_tensor(torch.tensor([[step, 4]]),
                                             torch.full((2, 2), 1.0 + step), (6, 2))
            opt.step()
        out.append((p.detach().clone(), opt.state[p]["step"]))
    assert torch.equal(out[0][0], out[1][0]) and out[0][1] == out[1][1] == 6


def test_embedding_training_matches_torch():
    # nn.Embedding(sparse=True) in a real forward/backward, two tables in two groups.
    def train(cls):
        torch.manual_seed(0)
        emb = torch.nn.Embedding(100, 16, sparse=True)
        emb2 = torch.nn.Embedding(30, 4, sparse=True)
        opt = cls([{"params": emb.parameters()}, {"params": emb2.parameters(), "lr": 0.05}], lr=0.01)
        for step in range(6):
            g = torch.Generator().manual_seed(step)
            idx = torch.randint(0, 100, (12, 5), generator=g)
            loss = emb(idx).square().sum() + emb2(idx % 30).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return emb.weight.detach(), emb2.weight.detach(), opt

    ours = train(fused_optim.SparseAdam)
    with correctly_rounded_sqrt():
        ref = train(torch.optim.SparseAdam)
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])


def test_signature_defaults_and_class_are_torch():
    import inspect

    ours = inspect.signature(fused_optim.SparseAdam.__init__).parameters
    ref = inspect.signature(torch.optim.SparseAdam.__init__).parameters
    assert list(ours)[:len(ref)] == list(ref)
    for key, p in ref.items():
        assert ours[key].kind == p.kind and ours[key].default == p.default, key
    # then fused_optim's own options, keyword-only and off (tests/test_api.py's list)
    assert list(ours)[len(ref):] == ["max_grad_norm", "grad_norm_type"]
    assert all(ours[k].kind == inspect.Parameter.KEYWORD_ONLY for k in ("max_grad_norm", "grad_norm_type"))
    ps = [torch.zeros(3, requires_grad=True)]
    assert fused_optim.SparseAdam(ps).defaults == torch.optim.SparseAdam(ps).defaults
    assert issubclass(fused_optim.SparseAdam, torch.optim.SparseAdam)
    assert fused_optim.SparseAdam.__doc__ == torch.optim.SparseAdam.__doc__
