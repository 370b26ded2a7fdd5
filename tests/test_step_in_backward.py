"""fused_optim.step_in_backward: updates during backward are bitwise those of
backward-then-step on a real model (params and every state tensor, with an LR scheduler, any
bucket size, 1 and 2 threads), checkpoints move to and from torch.optim, grads are freed
during backward, and what cannot be combined with it is refused with a clear error."""
import copy
import io
import os
import re
import subprocess
import sys
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.optim import lr_scheduler as S

import fused_optim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each algorithm with options that reach its less common branches.
ALGOS = {
    "SGD": (fused_optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    "Adam": (fused_optim.Adam, dict(lr=0.01, amsgrad=True, weight_decay=0.01)),
    "AdamW": (fused_optim.AdamW, dict(lr=torch.tensor(0.01), weight_decay=0.1)),
    "RMSprop": (fused_optim.RMSprop, dict(lr=0.01, momentum=0.9, centered=True)),
    "Adagrad": (fused_optim.Adagrad, dict(lr=0.05, lr_decay=0.01)),
    "Adamax": (fused_optim.Adamax, dict(lr=0.01, weight_decay=0.01)),
    "Adadelta": (fused_optim.Adadelta, dict(lr=0.5, weight_decay=0.01)),
    "NAdam": (fused_optim.NAdam, dict(lr=0.01, decoupled_weight_decay=True, weight_decay=0.1)),
    "RAdam": (fused_optim.RAdam, dict(lr=0.01)),
    "Rprop": (fused_optim.Rprop, dict(lr=0.01)),
    "ASGD": (fused_optim.ASGD, dict(lr=0.01, t0=2.0)),
}
# OneCycleLR cycles momentum (or betas[0]) where the algorithm has one.
CYCLES_MOMENTUM = ("SGD", "Adam", "AdamW", "RMSprop", "Adamax", "NAdam", "RAdam")
# MiB: one param per call, a few params per call, the default, everything in one bucket.
BUCKETS = (0, 0.004, 25.0, 1e6)
# (algorithm, bucket, threads): every algorithm at every bucket size, two at 2 threads.
CASES = [(a, b, 1) for a in ALGOS for b in BUCKETS] + [
    (a, b, 2) for a in ("AdamW", "SGD") for b in BUCKETS]

VOCAB, SEQ, BATCH, ITERS = 37, 6, 3, 4


class TinyLM(torch.nn.Module):
    """A small causal transformer: tied embedding and LM head, dropout off, and a branch
    that only some inputs use and a layer no input uses (params without grads)."""

    def __init__(self, d=16, heads=2, layers=2):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, d)
        self.pos = torch.nn.Parameter(torch.randn(SEQ, d) * 0.02)
        layer = torch.nn.TransformerEncoderLayer(d, heads, dim_feedforward=2 * d, dropout=0.0,
                                                 batch_first=True, norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.branch = torch.nn.Linear(d, d)
        self.unused = torch.nn.Linear(3, 3)
        self.ln = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, VOCAB, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx, use_branch=False):
        h = self.emb(idx) + self.pos[: idx.shape[1]]
        mask = torch.nn.Transformer.generate_square_subsequent_mask(idx.shape[1])
        h = self.blocks(h, mask=mask, is_causal=True)
        if use_branch:
            h = h + self.branch(h)
        return self.head(self.ln(h))


def make_model(seed=0):
    torch.manual_seed(seed)
    return TinyLM()


def param_groups(model, lr=0.01):
    """Two groups with different hyper-parameters, as a training script makes them."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0, "lr": lr * 0.5}]


def make_opt(name, model):
    cls, kw = ALGOS[name]
    kw = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    return cls(param_groups(model, kw["lr"]), **kw)


def loss_of(model, it, micro=0, use_branch=None):
    g = torch.Generator().manual_seed(1000 * it + micro)
    idx = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    target = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    if use_branch is None:
        use_branch = it % 2 == 1
    logits = model(idx, use_branch=use_branch)
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def train(model, opt, iters, sched=None, start=0, accumulate=1):
    for it in range(start, start + iters):
        for micro in range(accumulate):
            (loss_of(model, it, micro) / accumulate).backward()
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad()


def one_cycle(name, opt):
    return S.OneCycleLR(opt, max_lr=0.02, total_steps=ITERS + 2,
                        cycle_momentum=name in CYCLES_MOMENTUM)


def assert_same(model_a, opt_a, model_b, opt_b):
    """Every element of every param and of every state tensor, and the hyper-parameters."""
    for (name, p), q in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(p, q), name
        sa, sb = opt_a.state.get(p, {}), opt_b.state.get(q, {})
        assert sa.keys() == sb.keys(), name
        for key in sa:
            va, vb = sa[key], sb[key]
            assert type(va) is type(vb), (name, key)
            if isinstance(va, torch.Tensor):
                assert va.dtype == vb.dtype and va.device == vb.device, (name, key)
                assert torch.equal(va, vb), (name, key)
            else:
                assert va == vb, (name, key)
    for ga, gb in zip(opt_a.param_groups, opt_b.param_groups):
        assert repr({k: v for k, v in ga.items() if k != "params"}) == repr(
            {k: v for k, v in gb.items() if k != "params"})


@pytest.fixture
def threads(request):
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


@pytest.mark.parametrize("name, bucket, threads", CASES, indirect=["threads"])
def test_bitwise_equal_to_backward_then_step(name, bucket, threads):
    ref_model, model = make_model(), make_model()
    ref_opt, opt = make_opt(name, ref_model), make_opt(name, model)
    ref_sched, sched = one_cycle(name, ref_opt), one_cycle(name, opt)
    handle = fused_optim.step_in_backward(opt, bucket_cap_mb=bucket)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no scheduler warning about step() either
        train(ref_model, ref_opt, ITERS, ref_sched)
        train(model, opt, ITERS, sched)
    assert_same(model, opt, ref_model, ref_opt)
    assert opt.state_dict()["param_groups"] == ref_opt.state_dict()["param_groups"]
    # The layer no input reaches has no grad: untouched, and no state (as in torch.optim;
    # Adagrad makes every param's state in its constructor).
    assert torch.equal(model.unused.weight, make_model().unused.weight)
    assert model.unused.weight not in opt.state or name == "Adagrad"
    handle.remove()


def test_a_param_read_later_in_the_backward_raises_autograds_error():
    """A param updated in the backward (its grad complete) whose value a later part of the
    same backward still needs: autograd's "modified by an inplace operation" error, as with
    torch's own per-param hook recipe, not a silently different grad (Note [version
    counters]: the kernels bump the params' version counters)."""
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.u = torch.nn.Parameter(torch.randn(4))
            self.w = torch.nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            h = (x * self.u) @ self.w.detach()  # w's value saved for u's grad
            return (h @ self.w).square().sum()  # w's grad is complete first

    torch.manual_seed(0)
    x = torch.randn(3, 4)
    for recipe in ("torch", "ours"):
        model = Model()
        if recipe == "torch":
            for p in model.parameters():
                p.register_post_accumulate_grad_hook(
                    lambda p: torch.optim.SGD([p], lr=0.1).step())
        else:
            # (the optimizer kept: a dropped one is freed, its hooks with it)
            opt = fused_optim.SGD(model.parameters(), lr=0.1)
            fused_optim.step_in_backward(opt, bucket_cap_mb=0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            model(x).backward()


def test_grads_are_freed_and_params_updated_during_backward():
    model = make_model()
    opt = fused_optim.AdamW(model.parameters(), lr=0.01)
    fused_optim.step_in_backward(opt, bucket_cap_mb=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = {}

    def at_first_block_input(grad):  # late in backward: the last block's backward is done
        last = model.blocks.layers[-1]
        seen["grads"] = [p.grad for p in last.parameters()]
        seen["moved"] = [not torch.equal(p, before[f"blocks.layers.1.{n}"])
                         for n, p in last.named_parameters()]

    def hook_block_input(module, args):
        args[0].register_hook(at_first_block_input)

    model.blocks.register_forward_pre_hook(hook_block_input)
    loss_of(model, 0, use_branch=False).backward()
    assert seen["grads"] and all(g is None for g in seen["grads"])
    assert all(seen["moved"])
    # Every grad was freed by the end of backward (one param per bucket: none pending).
    assert all(p.grad is None for p in model.parameters())
    assert model.emb.weight in opt.state and model.unused.weight not in opt.state


def test_default_bucket_leaves_the_last_bucket_to_step():
    model = make_model()
    opt = fused_optim.Adam(model.parameters(), lr=0.01)
    fused_optim.step_in_backward(opt)  # 25 MiB: the whole tiny model is one pending bucket
    loss_of(model, 0, use_branch=False).backward()
    with_grads = [p for p in model.parameters() if p.grad is not None]
    assert with_grads and not opt.state
    opt.step()
    assert all(p.grad is None for p in model.parameters())
    assert all(p in opt.state for p in with_grads)


@pytest.mark.parametrize("name", ["AdamW", "SGD", "NAdam"])
@pytest.mark.parametrize("bucket", [0, 25.0])
@pytest.mark.parametrize("n", [2, 3])
def test_accumulation_steps_equal_n_backwards_then_one_step(name, bucket, n):
    # The branch is used in odd micro-batches only: with n=2 its grads are complete at the
    # second backward; with n=3 it misses the last one, and step() updates it.
    ref_model, model = make_model(), make_model()
    ref_opt, opt = make_opt(name, ref_model), make_opt(name, model)
    fused_optim.step_in_backward(opt, bucket_cap_mb=bucket, accumulation_steps=n)
    train(ref_model, ref_opt, 3, accumulate=n)
    train(model, opt, 3, accumulate=n)
    assert_same(model, opt, ref_model, ref_opt)
    # A step() after fewer backwards updates with what was accumulated, as torch.optim does.
    train(ref_model, ref_opt, 1, start=3)
    train(model, opt, 1, start=3)
    assert_same(model, opt, ref_model, ref_opt)


def roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_checkpoint_to_torch_optim_continues_identically():
    # step in backward, then torch.optim.AdamW from its checkpoint; against the same with a
    # plain fused_optim.AdamW first.
    runs = []
    for sib in (True, False):
        model = make_model()
        opt = fused_optim.AdamW(param_groups(model), lr=0.01)
        handle = fused_optim.step_in_backward(opt, bucket_cap_mb=0.004) if sib else None
        train(model, opt, 3)
        if handle is not None:
            handle.remove()  # its hooks would update these params in the next backwards
        sd = roundtrip(opt.state_dict())
        torch_opt = torch.optim.AdamW(param_groups(model), lr=0.01, foreach=False)
        torch_opt.load_state_dict(roundtrip(sd))  # (loaded tensors can be sd's own)
        train(model, torch_opt, 2, start=3)
        runs.append((model, torch_opt, sd))
    (m1, o1, sd1), (m2, o2, sd2) = runs
    assert sd1["param_groups"] == sd2["param_groups"]
    for k in sd2["state"]:
        for key, v in sd2["state"][k].items():
            assert torch.equal(sd1["state"][k][key], v), (k, key)
    assert_same(m1, o1, m2, o2)


def test_checkpoint_from_torch_optim_continues_identically():
    model = make_model()
    torch_opt = torch.optim.AdamW(param_groups(model), lr=0.01, foreach=False)
    train(model, torch_opt, 2)
    sd = roundtrip(torch_opt.state_dict())
    runs = []
    for sib in (True, False):
        m = copy.deepcopy(model)
        opt = fused_optim.AdamW(param_groups(m), lr=0.01)
        if sib:  # made before the checkpoint loads: load_state_dict replaces the groups
            handle = fused_optim.step_in_backward(opt, bucket_cap_mb=0)
        opt.load_state_dict(roundtrip(sd))  # loaded tensors can be the checkpoint's own
        train(m, opt, 3, start=2)
        runs.append((m, opt))
    assert_same(*runs[0], *runs[1])
    handle.remove()


def test_remove_restores_backward_then_step():
    ref_model, model = make_model(), make_model()
    ref_opt, opt = make_opt("Adam", ref_model), make_opt("Adam", model)
    ref_sched, sched = one_cycle("Adam", ref_opt), one_cycle("Adam", opt)
    with fused_optim.step_in_backward(opt, bucket_cap_mb=0) as handle:
        assert "step" in opt.__dict__
        train(model, opt, 2, sched)
    # The scheduler's wrapper, made before the handle, is the optimizer's step again.
    assert opt.__dict__["step"] is not handle._step
    assert hasattr(opt.step, "_wrapped_by_lr_sched")
    train(ref_model, ref_opt, 2, ref_sched)
    # Removed: backward leaves every grad, step() updates them all.
    loss_of(model, 2).backward()
    assert all(p.grad is not None for p in model.blocks.parameters())
    opt.step()
    sched.step()
    opt.zero_grad()
    train(ref_model, ref_opt, 1, ref_sched, start=2)
    assert_same(model, opt, ref_model, ref_opt)
    handle.remove()  # a second remove() does nothing
    # And a new handle can be made.
    fused_optim.step_in_backward(opt).remove()


def test_remove_mid_iteration_leaves_pending_to_the_plain_step():
    ref_model, model = make_model(), make_model()
    ref_opt, opt = make_opt("RMSprop", ref_model), make_opt("RMSprop", model)
    handle = fused_optim.step_in_backward(opt, bucket_cap_mb=0.004)
    loss_of(model, 0).backward()
    handle.remove()
    opt.step()
    opt.zero_grad()
    train(ref_model, ref_opt, 1)
    assert_same(model, opt, ref_model, ref_opt)


def test_scheduler_made_after_and_step_hooks_see_one_step_per_iteration():
    ref_model, model = make_model(), make_model()
    ref_opt, opt = make_opt("SGD", ref_model), make_opt("SGD", model)
    handle = fused_optim.step_in_backward(opt, bucket_cap_mb=0)
    ref_sched, sched = one_cycle("SGD", ref_opt), one_cycle("SGD", opt)  # after: wraps ours
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(model, opt, 3, sched)
        train(ref_model, ref_opt, 3, ref_sched)
    assert calls == ["pre", "post"] * 3
    assert_same(model, opt, ref_model, ref_opt)
    # The scheduler wraps our step: remove() leaves it there, passing calls through.
    handle.remove()
    loss_of(model, 3).backward()
    loss_of(ref_model, 3).backward()
    assert all(p.grad is not None for p in model.blocks.parameters())
    opt.step()
    ref_opt.step()
    assert_same(model, opt, ref_model, ref_opt)


def test_param_group_added_later_joins_at_the_next_iteration():
    ref_model, model = make_model(), make_model()
    ref_opt, opt = (fused_optim.Adam(list(m.blocks.parameters()), lr=0.01)
                    for m in (ref_model, model))
    fused_optim.step_in_backward(opt, bucket_cap_mb=0)
    train(model, opt, 1)
    train(ref_model, ref_opt, 1)
    for m, o in ((model, opt), (ref_model, ref_opt)):
        o.add_param_group({"params": [p for n, p in m.named_parameters()
                                      if not n.startswith("blocks.")], "lr": 0.002})
    train(model, opt, 3, start=1)
    train(ref_model, ref_opt, 3, start=1)
    assert_same(model, opt, ref_model, ref_opt)


def test_param_unfrozen_later_joins_at_the_next_iteration():
    ref_model, model = make_model(), make_model()
    ref_opt, opt = make_opt("AdamW", ref_model), make_opt("AdamW", model)
    for m in (model, ref_model):
        m.ln.requires_grad_(False)
    handle = fused_optim.step_in_backward(opt, bucket_cap_mb=0)
    train(model, opt, 1)
    train(ref_model, ref_opt, 1)
    for m in (model, ref_model):
        m.ln.requires_grad_(True)
    train(model, opt, 1, start=1)  # its update runs in step(); hooked from the next one
    assert model.ln.weight in handle._hooks
    loss_of(model, 2).backward()
    assert model.ln.weight.grad is None  # updated and freed in backward
    opt.step()
    opt.zero_grad()
    train(ref_model, ref_opt, 2, start=1)
    assert_same(model, opt, ref_model, ref_opt)


# -- refusals --------------------------------------------------------------------------


def snapshot(model, opt):
    return ([p.detach().clone() for p in model.parameters()],
            {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()})


def assert_unchanged(model, opt, snap):
    params, state = snap
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    assert {id(p) for p in opt.state} == set(state)
    for p, s in opt.state.items():
        for k, v in s.items():
            assert torch.equal(v, state[id(p)][k])


def test_refuses_torch_optim_optimizers():
    model = make_model()
    with pytest.raises(TypeError,
                       match=r"takes a fused_optim optimizer.*torch\.optim\.adamw\.AdamW"):
        fused_optim.step_in_backward(torch.optim.AdamW(model.parameters()))


@pytest.mark.parametrize("kwargs, match", [
    (dict(bucket_cap_mb=-1), "bucket_cap_mb must be a number >= 0"),
    (dict(bucket_cap_mb="25"), "bucket_cap_mb must be a number >= 0"),
    (dict(accumulation_steps=0), "accumulation_steps must be an int >= 1"),
    (dict(accumulation_steps=2.0), "accumulation_steps must be an int >= 1"),
])
def test_refuses_bad_arguments(kwargs, match):
    opt = fused_optim.SGD(make_model().parameters(), lr=0.1)
    with pytest.raises(ValueError, match=match):
        fused_optim.step_in_backward(opt, **kwargs)
    assert "step" not in opt.__dict__


def test_refuses_a_second_handle():
    opt = fused_optim.SGD(make_model().parameters(), lr=0.1)
    fused_optim.step_in_backward(opt)
    with pytest.raises(RuntimeError, match="already runs its step in backward"):
        fused_optim.step_in_backward(opt)


@pytest.mark.parametrize("bucket", [0, 25.0])
def test_refuses_gradient_accumulation_unless_asked(bucket):
    model = make_model()
    opt = fused_optim.Adam(model.parameters(), lr=0.01)
    fused_optim.step_in_backward(opt, bucket_cap_mb=bucket)
    train(model, opt, 1)
    loss_of(model, 1, use_branch=False).backward()
    snap = snapshot(model, opt)
    with pytest.raises(RuntimeError, match=r"a second backward reached a param before "
                                           r"optimizer\.step\(\).*accumulation_steps=N"):
        loss_of(model, 2, use_branch=False).backward()
    assert_unchanged(model, opt, snap)  # refused at the first hook of that backward


def test_refuses_more_backwards_than_accumulation_steps():
    model = make_model()
    opt = fused_optim.Adam(model.parameters(), lr=0.01)
    fused_optim.step_in_backward(opt, bucket_cap_mb=0, accumulation_steps=2)
    loss_of(model, 0, use_branch=False).backward()
    loss_of(model, 0, 1, use_branch=False).backward()
    snap = snapshot(model, opt)
    with pytest.raises(RuntimeError, match=r"backward number 3 reached a param since the last "
                                           r"optimizer\.step\(\), with accumulation_steps=2"):
        loss_of(model, 0, 2, use_branch=False).backward()
    assert_unchanged(model, opt, snap)


def test_refuses_clipping_by_global_norm():
    model = make_model()
    opt = fused_optim.AdamW(model.parameters(), lr=0.01)
    opt.max_grad_norm = 1.0
    with pytest.raises(RuntimeError,
                       match=r"cannot clip by the global grad norm \(max_grad_norm=1\.0\)"):
        fused_optim.step_in_backward(opt)
    # Set after the handle was made: refused at the first grad of the next iteration.
    opt.max_grad_norm = None
    fused_optim.step_in_backward(opt, bucket_cap_mb=0)
    train(model, opt, 1)
    opt.max_grad_norm = 0.5
    snap = snapshot(model, opt)
    with pytest.raises(RuntimeError, match="cannot clip by the global grad norm"):
        loss_of(model, 1).backward()
    assert_unchanged(model, opt, snap)


@pytest.mark.parametrize("option", ["differentiable", "capturable"])
def test_refuses_options_that_run_torchs_step(option):
    opt = fused_optim.Adam(make_model().parameters(), lr=0.01, **{option: True})
    with pytest.raises(RuntimeError, match=rf"{option}=True makes fused_optim\.Adam run "
                                           r"torch\.optim's own step"):
        fused_optim.step_in_backward(opt)


def test_refuses_a_closure():
    model = make_model()
    opt = fused_optim.SGD(model.parameters(), lr=0.1)
    fused_optim.step_in_backward(opt)

    def closure():
        loss = loss_of(model, 0)
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match=r"optimizer\.step\(closure\) is not supported"):
        opt.step(closure)


def test_a_backward_inside_step_is_refused_and_hooks_may_call_zero_grad_or_remove():
    # A step hook's backward reaches params whose update ran in this iteration's backward:
    # refused (with the handle's lock not reentrant, it hung: found by a review, 2026-12-06).
    # zero_grad() and remove() from a step hook take the same lock: they run.
    model = make_model()
    opt = fused_optim.SGD(param_groups(model), lr=0.1)
    fused_optim.step_in_backward(opt, bucket_cap_mb=0)
    hook = opt.register_step_pre_hook(lambda o, args, kwargs: loss_of(model, 5).backward())
    loss_of(model, 0).backward()
    with pytest.raises(RuntimeError, match=r"a backward ran inside optimizer\.step\(\)"):
        opt.step()
    hook.remove()
    opt.zero_grad()
    # The same from another thread, as CUDA's autograd runs a CUDA param's hooks on its
    # device thread (that thread waited for the handle's lock while step() waited for it).
    errors = []

    def backward_on_another_thread(o, args, kwargs):
        def run():
            try:
                loss_of(model, 6).backward()
            except RuntimeError as e:
                errors.append(str(e))
        thread = threading.Thread(target=run)
        thread.start()
        thread.join(timeout=60)
        assert not thread.is_alive(), "the backward's hook waited for step()"

    hook = opt.register_step_pre_hook(backward_on_another_thread)
    loss_of(model, 0).backward()
    opt.step()
    hook.remove()
    assert len(errors) == 1 and "a backward ran inside optimizer.step()" in errors[0]
    opt.zero_grad()
    assert_trains_on_as_the_plain_loop(model, opt)
    for call in ("zero_grad", "remove"):
        model = make_model()
        opt = fused_optim.SGD(param_groups(model), lr=0.1)
        handle = fused_optim.step_in_backward(opt, bucket_cap_mb=0)
        target = opt if call == "zero_grad" else handle
        opt.register_step_post_hook(lambda o, args, kwargs, t=target, c=call: getattr(t, c)())
        loss_of(model, 0).backward()
        opt.step()  # returns
        assert all(p.grad is None for p in model.parameters())
        if call == "remove":  # the hooks stay off: the plain loop from here
            assert not handle._hooks and "step" not in opt.__dict__
            plain = make_model()
            for m in (model, plain):
                loss_of(m, 1).backward()
            assert [p.grad is None for p in model.parameters()] == \
                [p.grad is None for p in plain.parameters()]
            assert any(p.grad is not None for p in model.parameters())


def assert_trains_on_as_the_plain_loop(model, opt):
    """Three more iterations of `opt` on `model` are those of a plain backward-then-step
    loop (a fresh optimizer of its class, loaded with its state) on a copy of it."""
    ref = copy.deepcopy(model)
    ref_opt = type(opt)(param_groups(ref), lr=0.01)
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    train(model, opt, 3, start=1)
    train(ref, ref_opt, 3, start=1)
    assert_same(model, opt, ref, ref_opt)


@pytest.mark.parametrize("then", ["keep_the_handle", "remove_the_handle"])
def test_refuses_a_grad_scaler_and_what_the_error_advises_then_works(then):
    # The refused step() ends the iteration and takes the scaler's scale and inf flag off
    # the optimizer (its step() would have, had ours returned): training on without the
    # scaler, with the handle or without it, is the plain loop's from the same point.
    model = make_model()
    opt = fused_optim.Adam(param_groups(model), lr=0.01)
    handle = fused_optim.step_in_backward(opt, bucket_cap_mb=0)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(loss_of(model, 0)).backward()
    with pytest.raises(RuntimeError, match="cannot be combined with a GradScaler"):
        scaler.step(opt)
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
    opt.zero_grad()
    if then == "remove_the_handle":
        handle.remove()
    assert_trains_on_as_the_plain_loop(model, opt)


def test_a_backward_that_raises_part_way_then_zero_grad_starts_a_new_iteration():
    # Some params were updated before the error, others wait: zero_grad() ends that
    # iteration, and the next ones are the plain loop's from there (before, every later
    # backward raised the second-backward error).
    class Boom(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            raise ValueError("boom in backward")

    model = make_model()
    opt = fused_optim.AdamW(param_groups(model), lr=0.01)
    fused_optim.step_in_backward(opt, bucket_cap_mb=0)
    early = Boom.apply(model.pos).sum() * 0.0  # made first: autograd runs it last
    loss = loss_of(model, 0) + early
    with pytest.raises(ValueError, match="boom in backward"):
        loss.backward()
    assert opt.state  # some params were updated before it
    opt.zero_grad()
    assert_trains_on_as_the_plain_loop(model, opt)


def test_refuses_adafactor_taking_eps1_from_a_group_of_several_dtypes():
    # eps=(None, ...) is the eps of the dtype of the group's first param with a grad, which
    # a bucket cannot know; an explicit eps1, or one dtype per group, is bitwise the plain loop.
    def model16():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(),
                                   torch.nn.Linear(16, 4).to(torch.bfloat16))

    model = model16()
    opt = fused_optim.Adafactor(model.parameters(), lr=0.01)
    with pytest.raises(RuntimeError, match=r"eps=\(None, \.\.\.\) in param group 0, whose "
                                           r"params have several dtypes"):
        fused_optim.step_in_backward(opt, bucket_cap_mb=0)
    eps = (torch.finfo(torch.float32).eps, 1e-3)
    runs = []
    for in_backward in (True, False):
        model = model16()
        opt = fused_optim.Adafactor(model.parameters(), lr=0.01, eps=eps)
        if in_backward:
            fused_optim.step_in_backward(opt, bucket_cap_mb=0)
        for it in range(3):
            x = torch.randn(5, 8, generator=torch.Generator().manual_seed(it))
            model[2](model[1](model[0](x)).to(torch.bfloat16)).float().square().mean().backward()
            opt.step()
            opt.zero_grad()
        runs.append((model, opt))
    assert_same(*runs[0], *runs[1])


def test_refuses_sparse_grads():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = fused_optim.SGD(emb.parameters(), lr=0.1)
    fused_optim.step_in_backward(opt, bucket_cap_mb=0)
    before = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match="does not support sparse grads"):
        emb(torch.tensor([1, 2])).sum().backward()
    assert torch.equal(emb.weight, before)


def test_refuses_several_processes(monkeypatch):
    # DDP all-reduces a grad after its post-accumulate hook has run.
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 2)
    opt = fused_optim.SGD(make_model().parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="does not support torch.distributed with several"):
        fused_optim.step_in_backward(opt)


def test_memory_benchmark_quick_runs():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*filter(None, sys.path), ROOT]))
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "step_in_backward.py"),
                          "--quick"], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    lines = out.stdout.strip().splitlines()
    assert "torch " in lines[0] and "cores" in lines[0]
    rows = [line for line in lines if line.startswith("| ") and "---" not in line]
    header, body = rows[0], rows[1:]
    assert "peak" in header and "ms/iter" in header
    assert [r.split("|")[1].strip() for r in body] == ["backward then step", "step in backward"]
    for r in body:
        cells = [c.strip() for c in r.split("|")[2:-1]]
        assert all(re.fullmatch(r"-?[\d.]+", c) for c in cells), r
    assert re.search(r"grads: [\d.]+ MiB", out.stdout)
    assert re.search(r"saved: -?[\d.]+ MiB = -?[\d.]+% of the grads .*(met|not met)", out.stdout)
    # the time ratio from the worker with the default allocator, the memory worker's beside it
    assert re.search(r"time: step in backward / backward then step = [\d.]+ .*"
                     r"(met|not met)\); in the memory worker [\d.]+", out.stdout)
    assert "params and losses after the run: bitwise equal" in out.stdout


def _train_checkpointed_blocks(in_backward, bucket_cap_mb, head_reuses_first_block=False):
    # Two blocks, each recomputed by torch.utils.checkpoint(use_reentrant=True) (as Hugging
    # Face's gradient_checkpointing_enable() does by default), between layers that are not.
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    inp, b1, b2, head = (torch.nn.Linear(6, 6) for _ in range(4))
    params = [p for m in (inp, b1, b2, head) for p in m.parameters()]
    opt = fused_optim.AdamW(params, lr=0.1)
    handle = fused_optim.step_in_backward(opt, bucket_cap_mb=bucket_cap_mb) if in_backward else None
    for step in range(3):
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(step))
        y = checkpoint(lambda t: torch.tanh(b1(t)), inp(x), use_reentrant=True)
        y = checkpoint(lambda t: torch.tanh(b2(t)), y, use_reentrant=True)
        if head_reuses_first_block:
            y = b1(y)  # b1 used inside a checkpointed segment and outside
        before = b1.weight.detach().clone()
        head(y).square().sum().backward()
        if in_backward and bucket_cap_mb == 0:
            # updated inside the segment's inner backward, its grad freed there
            assert b1.weight.grad is None and not torch.equal(b1.weight, before)
        opt.step()
        opt.zero_grad()
    if handle is not None:
        handle.remove()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("bucket_cap_mb", [0, 25])
def test_reentrant_checkpointing_of_whole_blocks_is_backward_then_step(bucket_cap_mb):
    # Each param used only inside its segment gets its whole grad in the segment's inner
    # backward, once: its update there is the one backward-then-step makes, bit for bit.
    expected = _train_checkpointed_blocks(False, bucket_cap_mb)
    got = _train_checkpointed_blocks(True, bucket_cap_mb)
    for p, q in zip(expected, got):
        assert torch.equal(p, q)


def test_reentrant_checkpointing_of_a_param_also_used_outside_raises():
    # The documented limit (docs/integrations.md): b1's grad arrives in two parts, one per
    # backward; the second part is refused as a second backward (after b1 was updated with
    # the first, which is why the docs say to use use_reentrant=False there).
    with pytest.raises(RuntimeError, match="a second backward reached a param"):
        _train_checkpointed_blocks(True, 0, head_reuses_first_block=True)


@pytest.mark.parametrize("bucket_cap_mb", [0, 25])
def test_non_reentrant_activation_checkpointing_is_backward_then_step(bucket_cap_mb):
    # torch.utils.checkpoint(use_reentrant=False) recomputes inside the one backward: a
    # param used inside and outside the segment still gets its whole grad once.
    from torch.utils.checkpoint import checkpoint

    def run(in_backward):
        torch.manual_seed(0)
        lin, head = torch.nn.Linear(6, 6), torch.nn.Linear(6, 1)
        params = list(lin.parameters()) + list(head.parameters())
        opt = fused_optim.AdamW(params, lr=0.1)
        handle = fused_optim.step_in_backward(opt, bucket_cap_mb=bucket_cap_mb) if in_backward else None
        for step in range(3):
            x = torch.randn(4, 6, generator=torch.Generator().manual_seed(step))
            y = lin(torch.tanh(checkpoint(lin, x, use_reentrant=False)))  # lin twice
            head(y).square().sum().backward()
            opt.step()
            opt.zero_grad()
        if handle is not None:
            handle.remove()
        return [p.detach().clone() for p in params], opt

    (a, oa), (b, ob) = run(False), run(True)
    for p, q in zip(a, b):
        assert torch.equal(p, q)


@pytest.mark.parametrize("bucket", [0.0, 25.0])
@pytest.mark.parametrize("how", ["views", "data"])
def test_params_sharing_one_buffer_train_as_the_plain_loop(how, bucket):
    """Note [params sharing memory in step in backward]: params made views of one flat
    buffer share its version counter, and an update during backward made autograd refuse
    what it saved of the others, part way through the backward (found by a review,
    2026-12-05). They now wait until every param of the buffer has its grad: bitwise
    backward-then-step, for views and for params whose `.data` are slices of one buffer,
    with each param its own bucket and with one bucket."""
    runs = []
    for use_handle in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(),
                                    torch.nn.Linear(16, 16), torch.nn.Tanh(),
                                    torch.nn.Linear(16, 2))
        shared = [model[0], model[2]]  # (the last layer keeps its own memory)
        flat = torch.cat([p.detach().reshape(-1) for m in shared for p in m.parameters()])
        offset = 0
        for mod in shared:
            for name in ("weight", "bias"):
                p = getattr(mod, name)
                view = flat[offset:offset + p.numel()].view(p.shape)
                if how == "views":
                    setattr(mod, name, torch.nn.Parameter(view))
                else:
                    p.data = view
                offset += p.numel()
        opt = fused_optim.AdamW(model.parameters(), lr=0.01)
        updated_in_backward = []
        if use_handle:
            fused_optim.step_in_backward(opt, bucket_cap_mb=bucket)
        for it in range(3):
            x = torch.randn(4, 8, generator=torch.Generator().manual_seed(it))
            model(x).square().mean().backward()
            updated_in_backward.append(model[4].weight.grad is None)
            opt.step()
            opt.zero_grad()
        runs.append((flat.clone(), [p.detach().clone() for p in model.parameters()],
                     updated_in_backward))
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    # (the last layer, its own memory, updated during backward: with one bucket too, the
    # pending ones go once the shared buffer's params all have their grads)
    assert all(runs[1][2])


@pytest.mark.parametrize("bucket", [0.0, 25.0])
def test_hyper_parameters_set_between_backward_and_step_apply_from_the_next_iteration(bucket):
    """Note [hyper-parameters in step in backward]: `g["lr"] = ...` between backward() and
    step() (found by a review, 2026-12-05): the params updated during backward used the old
    value, the pending ones the new (silently mixed). Now the whole iteration uses the old
    values, with a warning, and the new ones apply from the next: bitwise the plain loop
    with each edit made after its step() instead. (With one bucket, this small model's
    default, nothing is updated before step(): the edit applies to the iteration, as in the
    plain loop, without a warning.)"""
    updated_in_backward = bucket == 0.0
    lrs = [0.01, 0.02, 0.005, 0.03]

    def run(handle):
        model = make_model()
        opt = make_opt("AdamW", model)
        if handle:
            fused_optim.step_in_backward(opt, bucket_cap_mb=bucket)
        caught = []
        for it in range(len(lrs)):
            loss_of(model, it).backward()
            if handle:
                with warnings.catch_warnings(record=True) as w:
                    warnings.simplefilter("always")
                    for g in opt.param_groups:
                        g["lr"] = lrs[it]
                    opt.step()
                caught += [str(x.message) for x in w]
            else:
                if not updated_in_backward:
                    for g in opt.param_groups:
                        g["lr"] = lrs[it]
                opt.step()
                for g in opt.param_groups:
                    g["lr"] = lrs[it]
            opt.zero_grad()
        return model, opt, caught

    model_a, opt_a, _ = run(False)
    model_b, opt_b, caught = run(True)
    assert_same(model_a, opt_a, model_b, opt_b)
    warned = any("param_groups[0]['lr']" in m and "changed between backward() and step()" in m
                 for m in caught)
    assert warned == updated_in_backward


def test_a_handle_never_removed_does_not_keep_the_model_alive():
    """The params' hooks held the handle, which holds the optimizer, whose groups hold the
    params: a cycle through hooks torch keeps in C++, which its collector cannot free, so
    a model trained with a handle never removed stayed in memory for good (found by a
    review, 2026-12-05). After the last reference goes (and a collection), the optimizer,
    its state and the params are freed; with remove(), without waiting for a collection."""
    import gc
    import weakref

    def run(remove):
        model = torch.nn.Linear(16, 16)
        opt = fused_optim.AdamW(model.parameters())
        handle = fused_optim.step_in_backward(opt)
        model(torch.randn(2, 16)).sum().backward()
        opt.step()
        opt.zero_grad()
        if remove:
            handle.remove()
        return weakref.ref(opt), weakref.ref(model.weight), weakref.ref(opt.state[model.weight]["exp_avg"])

    refs = run(remove=False)
    gc.collect()
    assert all(r() is None for r in refs)
    enabled = gc.isenabled()
    gc.disable()
    try:
        refs = run(remove=True)
        assert all(r() is None for r in refs)  # (no collection ran)
    finally:
        if enabled:
            gc.enable()


def test_a_fused_option_set_on_a_group_is_refused_before_the_iterations_updates():
    """An option of the optimizer set on a param group is refused by step(); with step in
    backward that came after the iteration's updates had run without it, and the next
    backward was then refused as a second one (found by a review, 2026-12-05). Refused at
    the iteration's first grad now, before anything changes; after the key goes, training
    goes on."""
    model = make_model()
    opt = make_opt("AdamW", model)
    fused_optim.step_in_backward(opt, bucket_cap_mb=0)
    opt.param_groups[0]["max_grad_norm"] = 1.0
    snap = snapshot(model, opt)
    with pytest.raises(ValueError, match="'max_grad_norm' is an option of the optimizer"):
        loss_of(model, 0).backward()
    assert_unchanged(model, opt, snap)
    del opt.param_groups[0]["max_grad_norm"]
    opt.zero_grad()
    loss_of(model, 0).backward()
    opt.step()
    opt.zero_grad()


def test_a_dropped_optimizer_stops_at_once_and_takes_its_hooks_off():
    """Note [what step in backward holds]: an optimizer dropped without remove() is freed
    with its last reference (no cycle waits for the collector, disabled here), its hooks
    come off the params, and a backward after it leaves the grads to whoever steps next
    (found by a review: the dropped optimizer went on updating the model and taking its
    grads until the collector ran, then left a dead hook per param for good). A handle kept
    after remove() keeps nothing alive."""
    import gc
    import weakref

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 2)
    x = torch.randn(4, 8)
    gc.disable()
    try:
        opt = fused_optim.AdamW(model.parameters(), lr=0.1)
        handle = fused_optim.step_in_backward(opt, bucket_cap_mb=0)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        gone = weakref.ref(opt)
        del opt, handle
        assert gone() is None
        assert not model.weight._post_accumulate_grad_hooks  # (torch's dict of them)
        before = model.weight.detach().clone()
        model(x).square().mean().backward()
        assert model.weight.grad is not None and torch.equal(model.weight.detach(), before)

        opt = fused_optim.SGD(model.parameters(), lr=0.1)
        handle = fused_optim.step_in_backward(opt)
        handle.remove()
        gone = weakref.ref(opt)
        del opt
        assert gone() is None and handle.optimizer is None
    finally:
        gc.enable()


FORK_SCRIPT = """
import faulthandler, os, sys, threading
import torch, fused_optim
torch.set_num_threads(1)
model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
opt = fused_optim.Adam(model.parameters(), lr=1e-3)
handle = fused_optim.step_in_backward(opt, bucket_cap_mb=0.0)
held, release = threading.Event(), threading.Event()


def train():
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    opt.zero_grad()


if sys.argv[1] == "lock":
    def hold():  # (as a thread inside a backward's hook holds it)
        with handle._lock:
            held.set()
            release.wait()
else:  # (a thread inside step(), held there by a step pre-hook)
    def pre_hook(o, args, kwargs):
        if threading.current_thread() is not threading.main_thread():
            held.set()
            release.wait()
    opt.register_step_pre_hook(pre_hook)
    hold = train

holder = threading.Thread(target=hold)
holder.start()
held.wait()
pid = os.fork()
if pid == 0:
    faulthandler.dump_traceback_later(30, exit=True)  # (a hang: exit status 1)
    if sys.argv[1] == "step":
        opt.zero_grad()  # (the parent's iteration, unfinished here: the child's own starts)
    train()
    os._exit(7)
_, status = os.waitpid(pid, 0)
release.set()
holder.join()
print(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("where", ["lock", "step"])
def test_a_child_forked_while_another_thread_holds_the_lock_can_train(where):
    """A child forked while another thread of the parent was inside a hook or step() (its
    handle's lock held: DataLoader workers fork at any time) inherited the lock held by a
    thread it does not have, and its first backward waited for good (found by a review,
    2026-12-06). Each live handle's lock is made anew in the child (os.register_at_fork).
    Where that thread was inside step(), the child is not (its first backward was refused
    as one inside step(), found by a second review); it starts its own iteration with
    zero_grad(). In a subprocess: the child exits with 7 once its iteration is done."""
    out = subprocess.run([sys.executable, "-c", FORK_SCRIPT, where], capture_output=True,
                         text=True,
                         timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0 and out.stdout.strip() == "7", (out.stdout, out.stderr)
