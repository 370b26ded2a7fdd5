"""Step semantics beyond the math: skipped params, GradScaler, determinism, bad input."""
import copy
import inspect
import os
import pickle
import re
import subprocess
import sys
import warnings

import pytest
import torch

import fused_optim
import parity_utils as pu

PAIRS = [(name, t, o) for name, (t, o) in pu.ALGOS.items()]
PAIR_IDS = [name for name, _, _ in PAIRS]
STATEFUL = {"SGD": dict(lr=0.1, momentum=0.9), "Adam": dict(lr=0.01, amsgrad=True),
            "AdamW": dict(lr=0.01), "RMSprop": dict(lr=0.01, momentum=0.9, centered=True),
            "Adagrad": dict(lr=0.05, lr_decay=0.01, initial_accumulator_value=0.1),
            "Adamax": dict(lr=0.01, weight_decay=0.1),
            "Adadelta": dict(lr=0.5, rho=0.8, weight_decay=0.01),
            "NAdam": dict(lr=0.01, weight_decay=0.1, momentum_decay=0.1),
            "RAdam": dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
            "Rprop": dict(lr=0.01, step_sizes=(5e-3, 0.02)),
            "ASGD": dict(lr=0.01, lambd=0.1, t0=2.0, weight_decay=0.1)}


def snapshot(opt, ps):
    return [p.detach().clone() for p in ps], {
        i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(ps) if p in opt.state}


def assert_unchanged(before, opt, ps):
    params, state = before
    for a, b in zip(params, ps):
        assert torch.equal(a, b)
    assert set(state) == {i for i, p in enumerate(ps) if p in opt.state}
    for i, s in state.items():
        for k, v in s.items():
            assert torch.equal(v, opt.state[ps[i]][k]), f"state {k} changed"


@pytest.mark.parametrize("name,torch_cls,ours_cls", PAIRS, ids=PAIR_IDS)
def test_step_with_every_grad_none_is_a_noop(name, torch_cls, ours_cls):
    ps = [torch.randn(5, requires_grad=True) for _ in range(3)]
    opt = ours_cls(ps, **STATEFUL[name])
    ref = torch_cls([p.detach().clone().requires_grad_() for p in ps], **STATEFUL[name])
    before = snapshot(opt, ps)
    opt.step()
    ref.step()
    assert_unchanged(before, opt, ps)
    # No state for params that never had a grad; torch's Adagrad alone makes every param's
    # state at construction (step 0), and keeps it untouched, as here.
    assert len(opt.state) == len(ref.state) == (len(ps) if name == "Adagrad" else 0)


@pytest.mark.parametrize("name,torch_cls,ours_cls", PAIRS, ids=PAIR_IDS)
def test_params_without_grad_get_no_state_and_no_step(name, torch_cls, ours_cls):
    a, b = torch.randn(5, requires_grad=True), torch.randn(5, requires_grad=True)
    b0 = b.detach().clone()
    opt = ours_cls([a, b], **STATEFUL[name])
    ref = torch_cls([a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()],
                    **STATEFUL[name])
    a.grad = torch.randn(5)
    ref.param_groups[0]["params"][0].grad = a.grad.clone()
    opt.step()
    ref.step()
    ref_a, ref_b = ref.param_groups[0]["params"]
    assert torch.equal(b, b0)
    assert (b in opt.state) == (ref_b in ref.state) == (name == "Adagrad")  # see above
    for k, v in ref.state.get(ref_b, {}).items():
        assert torch.equal(opt.state[b][k], v), k  # Adagrad: step 0, sum untouched
    assert opt.state[a].keys() == ref.state[ref_a].keys()


def _scaler_run(cls, kwargs, inf_at_step, steps=6, handoff=False):
    """A tiny model trained with GradScaler("cpu"); an inf grad is injected at one step.
    `handoff`: the scaler hands its scale to our step (Note [GradScaler's handoff])."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = cls(model.parameters(), **kwargs)
    if handoff:
        opt._step_supports_amp_scaling = True
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    data = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    history = []
    for step in range(steps):
        opt.zero_grad()
        loss = model(data).pow(2).mean()
        scaler.scale(loss).backward()
        if step == inf_at_step:
            model[0].weight.grad[0, 0] = float("inf")
        before = snapshot(opt, list(model.parameters()))
        scaler.step(opt)
        scaler.update()
        history.append((before, scaler.get_scale(),
                        [p.grad.clone() for p in model.parameters()]))
    return model, opt, history


@pytest.mark.parametrize("handoff", [False, True])
@pytest.mark.parametrize("name,torch_cls,ours_cls", PAIRS, ids=PAIR_IDS)
def test_grad_scaler_overflow_skips_step_then_training_matches_torch(name, torch_cls, ours_cls,
                                                                     handoff):
    with pu.correctly_rounded_sqrt():  # see parity_utils: makes torch's for-loop exact
        ref_model, ref_opt, ref_hist = _scaler_run(torch_cls, dict(STATEFUL[name], foreach=False), 2)
    model, opt, hist = _scaler_run(ours_cls, STATEFUL[name], 2, handoff=handoff)
    assert opt._step_supports_amp_scaling == handoff
    ps = list(model.parameters())
    # The overflow step changed nothing (params, state, step counts)...
    skipped_before = hist[2][0]
    after_skip = hist[3][0]
    for a, b in zip(skipped_before[0], after_skip[0]):
        assert torch.equal(a, b)
    for i, s in skipped_before[1].items():
        for k, v in s.items():
            assert torch.equal(v, after_skip[1][i][k]), f"state {k} changed on a skipped step"
    # ...the scale backed off exactly as with torch.optim...
    assert [h[1] for h in hist] == [h[1] for h in ref_hist]
    assert hist[2][1] == hist[1][1] / 2
    # ...grads were left unscaled on normal steps, as with torch.optim (on the skipped
    # step, with the handoff, they are left untouched, as torch's fused path leaves them)...
    for step, ((_, _, g), (_, _, rg)) in enumerate(zip(hist, ref_hist)):
        if step == 2:
            continue
        for a, b in zip(g, rg):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    # ...and training continues bit for bit in step with torch.optim.
    for a, b in zip(ps, ref_model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(ps, ref_model.parameters()):
        for k, v in ref_opt.state[b].items():
            assert torch.equal(opt.state[a][k], v), k


@pytest.mark.parametrize("handoff", [False, True])
@pytest.mark.parametrize("name,torch_cls,ours_cls", PAIRS, ids=PAIR_IDS)
def test_a_skipped_first_step_makes_no_state(name, torch_cls, ours_cls, handoff):
    """GradScaler skips a first step with an inf grad: torch's for-loop is not called, and
    makes no state. Ours made it, with the lr of that moment where a state keeps it (Rprop's
    step_size, ASGD's eta): after a scheduler's change of lr, the first real step differed
    (found by a review, 2026-12-06). Now torch's state (none), and the real steps bitwise
    torch's. Without the handoff, the skipped step is not a call of step() either, as with
    torch's for-loop: its step hooks (and an LR scheduler's order warning, Accelerate's
    step_was_skipped) see what they see with torch.optim."""
    out = []
    for cls, kw in ((torch_cls, dict(STATEFUL[name], foreach=False)), (ours_cls, STATEFUL[name])):
        p = torch.nn.Parameter(torch.linspace(-1, 1, 6))
        opt = cls([p], **kw)
        if handoff and cls is ours_cls:
            opt._step_supports_amp_scaling = True
        hooks = []
        opt.register_step_pre_hook(lambda *a: hooks.append("pre"))
        opt.register_step_post_hook(lambda *a: hooks.append("post"))
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
        for step in range(3):
            scaler.scale(torch.ones(()))
            p.grad = torch.linspace(-0.5, 0.7, 6) * scaler.get_scale()
            if step == 0:
                p.grad[1] = float("inf")
            with pu.correctly_rounded_sqrt(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # (the scheduler's "step before optimizer")
                scaler.step(opt)
            if step == 0:  # (none; Adagrad's, made by its constructor, unchanged)
                skipped = {k: v.clone() for k, v in opt.state.get(p, {}).items()}
            scaler.update()
            sched.step()
        out.append((p.detach().clone(), dict(opt.state[p]), skipped, hooks))
    assert out[0][3] == ["pre", "post"] * 2
    if not handoff:
        assert out[1][3] == out[0][3]
    else:  # (with the handoff the skipped step is a call of step(): docs/parity.md)
        assert out[1][3] == ["pre", "post"] * 3
    assert out[1][2].keys() == out[0][2].keys()
    for k, v in out[0][2].items():
        assert torch.equal(out[1][2][k], v), k
    assert torch.equal(out[1][0], out[0][0])
    assert out[1][1].keys() == out[0][1].keys()
    for k, v in out[0][1].items():
        assert torch.equal(out[1][1][k], v), k


@pytest.mark.parametrize("name,torch_cls,ours_cls", PAIRS + [
    (n, getattr(torch.optim, n), getattr(fused_optim, n))
    for n in ("Adafactor", "SparseAdam", "Muon") if hasattr(torch.optim, n)],
    ids=lambda x: x if isinstance(x, str) else "")
def test_the_grad_scaler_flag_is_torchs_unless_an_option_of_ours_needs_it(name, torch_cls,
                                                                         ours_cls):
    """Note [GradScaler's handoff]: `_step_supports_amp_scaling` (which GradScaler, Lightning
    and Accelerate read) is what torch's class sets: off, and on for fused=True; on while
    max_grad_norm is set or a step_in_backward handle is attached; a user may set it. It
    was always on, and Lightning refused gradient_clip_val with every fused_optim optimizer
    (found by a review, 2026-12-06). Copies and pickles keep what torch's keep: not the
    flag itself (torch's __getstate__ leaves it out), but max_grad_norm."""
    params = [torch.nn.Parameter(torch.randn(4, 4))]
    kwargs = dict(lr=0.01)
    variants = [({}, {})]
    if "fused" in inspect.signature(torch_cls.__init__).parameters:
        variants.append(({"fused": True}, {"fused": True}))
    for ours_kw, torch_kw in variants:
        ref = torch_cls([torch.nn.Parameter(torch.randn(4, 4))], **kwargs, **torch_kw)
        opt = ours_cls(params, **kwargs, **ours_kw)
        expected = getattr(ref, "_step_supports_amp_scaling", False)
        assert opt._step_supports_amp_scaling == expected, ours_kw
        expected = getattr(copy.deepcopy(ref), "_step_supports_amp_scaling", False)
        assert copy.deepcopy(opt)._step_supports_amp_scaling == expected
        assert pickle.loads(pickle.dumps(opt))._step_supports_amp_scaling == expected
    opt = ours_cls(params, **kwargs)
    assert not opt._step_supports_amp_scaling
    if name != "SparseAdam":  # (refuses max_grad_norm)
        opt.max_grad_norm = 1.0
        assert opt._step_supports_amp_scaling
        assert pickle.loads(pickle.dumps(opt))._step_supports_amp_scaling
        opt.max_grad_norm = None
        assert not opt._step_supports_amp_scaling
    opt._step_supports_amp_scaling = True
    assert opt._step_supports_amp_scaling
    del opt._step_supports_amp_scaling  # (as on torch's fused=True optimizers)
    assert not opt._step_supports_amp_scaling
    # A pickle made before the flag was a property held it as an attribute: left out.
    state = opt.__getstate__()
    state["_step_supports_amp_scaling"] = True
    old = ours_cls.__new__(ours_cls)
    old.__setstate__(state)
    assert "_step_supports_amp_scaling" not in vars(old) and not old._step_supports_amp_scaling
    if name in PAIR_IDS:  # (step_in_backward takes the elementwise algorithms)
        handle = fused_optim.step_in_backward(opt)
        assert opt._step_supports_amp_scaling  # (so that its step() sees a scaler)
        handle.remove()
        assert not opt._step_supports_amp_scaling


@pytest.mark.parametrize("how", ["grad_scaler", "max_grad_norm", "plain"])
def test_fused_adagrad_refuses_a_sparse_grad_before_anything_changes(how):
    """Adagrad(fused=True) with a sparse grad in its second group: torch's error, and no
    grad or param changed (with max_grad_norm too, whose norm refuses sparse grads). Before 2026-12-07 the torch step it went to unscaled (or
    clipped) every grad in place and updated the first group, then raised (torch's own
    fused step updates the first group too: ours checks first)."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 4, sparse=True)
    lin = torch.nn.Linear(4, 1)
    opt = fused_optim.Adagrad([{"params": lin.parameters()}, {"params": emb.parameters()}],
                              lr=0.1, fused=True,
                              **({"max_grad_norm": 1e-3} if how == "max_grad_norm" else {}))
    loss = lin(emb(torch.tensor([1, 2]))).sum()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0) if how == "grad_scaler" else None
    (scaler.scale(loss) if scaler else loss).backward()
    before = [(p.detach().clone(), p.grad.to_dense().clone()) for p in opt.param_groups[0]["params"]
              + opt.param_groups[1]["params"]]
    # (with max_grad_norm, the norm's error first: torch has no norm of sparse grads, and
    # torch.nn.utils.clip_grad_norm_ raises the same)
    error, message = ((NotImplementedError, "'aten::linalg_vector_norm' with arguments from the 'SparseCPU'")
                      if how == "max_grad_norm" else
                      (RuntimeError, "`fused` does not support sparse grad or complex param"))
    with pytest.raises(error, match=re.escape(message)):
        scaler.step(opt) if scaler else opt.step()
    after = [(p.detach(), p.grad.to_dense()) for p in opt.param_groups[0]["params"]
             + opt.param_groups[1]["params"]]
    for (p0, g0), (p1, g1) in zip(before, after, strict=True):
        assert torch.equal(p0, p1) and torch.equal(g0, g1)


def test_a_scaler_step_reads_found_inf_only_where_a_state_would_be_made():
    # Reading found_inf synchronises with a GPU: SGD without momentum keeps no state, so its
    # steps never make one (a review found every such step asking, 2026-12-06).
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    for momentum, makes in ((0.0, False), (0.9, True)):
        opt = fused_optim.SGD([p], lr=0.1, momentum=momentum)
        keys = [opt._step_keys(g) for g in opt.param_groups]
        assert opt._makes_state(opt.param_groups, keys) == makes


def _run_with_fused_optim(script):
    """`python -c script` in a fresh process (an import's effects), with this checkout's
    fused_optim importable."""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300,
                   env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(
                       os.path.abspath(__file__)))))


def test_import_under_a_meta_default_device():
    # fused_optim's import makes a few tensors (the 8-bit maps, Muon's probe): on the CPU,
    # whatever the default device (under torch.set_default_device("meta") it failed; found
    # by a review, 2026-12-06).
    script = ("import torch; torch.set_default_device('meta'); import fused_optim, sys; "
              "from fused_optim import _support; "
              "m = getattr(fused_optim, 'muon', None); "
              "sys.exit(m is not None and m._NORMALIZES_BUFFER != "
              "(_support._release(torch.__version__) < (2, 15)))")
    _run_with_fused_optim(script)


def test_import_inside_a_fake_tensor_mode():
    # A tracer's FakeTensorMode active at `import fused_optim` made the import's tensors fake,
    # and reading the 8-bit map's zero code raised DataDependentOutputException (a known,
    # unmended failure until 2026-12-06): they are made real (_ops.real_tensors). The import's
    # values are then those of a plain import, and an 8-bit step after it is right.
    script = ("import torch, sys\n"
              "from torch._subclasses.fake_tensor import FakeTensorMode\n"
              "with FakeTensorMode():\n"
              "    import fused_optim\n"
              "    from fused_optim import quantization as q\n"
              "from fused_optim import _support\n"
              "m = getattr(fused_optim, 'muon', None)\n"
              "assert m is None or m._NORMALIZES_BUFFER == "
              "(_support._release(torch.__version__) < (2, 15)), m._NORMALIZES_BUFFER\n"
              "assert type(q._VALUES) is torch.Tensor and type(q._THRESHOLDS) is torch.Tensor\n"
              "code, scale = q._ZERO\n"
              "c, s = q.quantize(torch.zeros(q.BLOCK))\n"
              "assert (code, scale) == (int(c[0]), float(s[0])), (code, scale)\n")
    _run_with_fused_optim(script)


def _deterministic_model():
    # Several tensors larger than the parallel grain, odd sizes, mixed dtypes in one group.
    g = torch.Generator().manual_seed(0)
    shapes = [(70001,), (3, 40000), (33333,), (5,), (65536 + 17,)]
    ps = [torch.randn(s, generator=g).requires_grad_() for s in shapes]
    ps.append(torch.randn(50000, generator=g).bfloat16().requires_grad_())
    ps.append(torch.randn(40000, generator=g).double().requires_grad_())
    return ps


def _train(cls, kwargs, threads, steps=5):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ps = _deterministic_model()
        opt = cls(ps, **kwargs)
        for step in range(steps):
            g = torch.Generator().manual_seed(step)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
            opt.step()
        return ps, opt
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("name,torch_cls,ours_cls", PAIRS, ids=PAIR_IDS)
def test_bitwise_identical_across_thread_counts(name, torch_cls, ours_cls):
    ref_ps, ref_opt = _train(ours_cls, STATEFUL[name], threads=1)
    for threads in (2, 3):
        ps, opt = _train(ours_cls, STATEFUL[name], threads=threads)
        for p, q in zip(ps, ref_ps):
            assert torch.equal(p, q), f"{threads} threads"
            for k, v in ref_opt.state[q].items():
                assert torch.equal(opt.state[p][k], v), f"{threads} threads, state {k}"


ISA_SCRIPT = r"""
import sys, torch, fused_optim
sys.path.insert(0, {tests!r})
import test_behaviour as tb
out = {{"isa": torch.ops.fused_optim._cpu_isa()}}
for name, kwargs in tb.STATEFUL.items():
    ps, opt = tb._train(getattr(fused_optim, name), kwargs, threads=2, steps=3)
    out[name] = [p.detach() for p in ps] + [v for p in ps for v in opt.state[p].values()]
torch.save(out, sys.argv[1])
"""
ISAS = ("baseline", "avx2", "avx512", "avx512bf16")


def _run_isas(script, tmp_path, *args):
    """Runs `script` (which saves a dict to argv[1]) with each FUSED_OPTIM_ISA cap."""
    results = {}
    for isa in ISAS:
        out = tmp_path / f"{isa}.pt"
        # (each copy of the float32 loops too, where the tuning table would run the AVX2
        # copy's: Note [float loops in AVX2])
        env = dict(os.environ, FUSED_OPTIM_ISA=isa, FUSED_OPTIM_FLOAT_LOOPS="avx512")
        subprocess.run([sys.executable, "-c", script, str(out), *args], env=env, check=True,
                       timeout=300)
        results[isa] = torch.load(out)
        # A cap never raises the ISA: on a CPU without it, the next lower copy runs.
        assert ISAS.index(results[isa].pop("isa")) <= ISAS.index(isa)
    return results


def test_bitwise_identical_across_isas(tmp_path):
    """The baseline, AVX2, AVX-512 and AVX512-BF16 copies of the loops give the same bits."""
    results = _run_isas(ISA_SCRIPT.format(tests=os.path.dirname(__file__)), tmp_path)
    for isa in ISAS[1:]:
        for name, tensors in results["baseline"].items():
            for a, b in zip(tensors, results[isa][name]):
                assert torch.equal(a, b), f"{name}: {isa} differs from baseline"


# Note [CPU tuning]: the software prefetch (on/off, its distance) and the gather's prefetch
# change no bit. Each choice forced, in a process of its own (the choice is made once per
# process): the model above plus 300 small tensors, where the prefetches run across tensor
# boundaries, and bf16 and fp16 params (whose loops ask for 2N elements ahead).
TUNING_SCRIPT = ISA_SCRIPT.replace("torch.save(out, sys.argv[1])", r"""
out["tuning"] = torch.ops.fused_optim._cpu_tuning()
g = torch.Generator().manual_seed(1)
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    ps = [torch.randn(int(n), generator=g).to(dtype).requires_grad_()
          for n in torch.randint(1, 3000, (300,), generator=g)]
    for name in ("Adam", "SGD"):
        opt = getattr(fused_optim, name)(ps, lr=0.01, **({{"momentum": 0.9}} if name == "SGD" else {{}}))
        for step in range(3):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g).to(dtype)
            opt.step()
        out[(name, str(dtype))] = [p.detach().clone() for p in ps] + [
            v for p in ps for v in opt.state[p].values()]
    # Adafactor's passes prefetch too (Note [Adafactor's prefetch]): matrices of widths
    # that are not multiples of a chunk, a batch of them, one of several row blocks, vectors.
    ps = [torch.randn(s, generator=g).to(dtype).requires_grad_()
          for s in [(7, 1000), (300, 129), (2, 3, 257), (4100, 1030), (5000,), (33,)]]
    opt = fused_optim.Adafactor(ps, lr=0.01, weight_decay=0.01)
    for step in range(3):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g).to(dtype)
        opt.step()
    out[("Adafactor", str(dtype))] = [p.detach().clone() for p in ps] + [
        v for p in ps for v in opt.state[p].values()]
# Adafactor with float32 and bfloat16 params in one group (16-bit params make waves of
# their own: Note [Adafactor's waves]).
ps = [torch.randn(s, generator=g).to(dt).requires_grad_()
      for s, dt in [((300, 129), torch.float32), ((7, 1000), torch.bfloat16),
                    ((4100, 1030), torch.float32), ((5000,), torch.bfloat16),
                    ((2, 3, 257), torch.bfloat16), ((600, 700), torch.float32)]]
opt = fused_optim.Adafactor(ps, lr=0.01, weight_decay=0.01)
for step in range(3):
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
    opt.step()
out[("Adafactor", "mixed")] = [p.detach().clone() for p in ps] + [
    v for p in ps for v in opt.state[p].values()]
# 8-bit moments (Note [8-bit codes by arithmetic]: by the table's gather or by arithmetic),
# float32 and bfloat16 params, values spread over many binades.
for dtype in (torch.float32, torch.bfloat16):
    ps = [(torch.randn(n, generator=g) * torch.logspace(-6, 2, n)).to(dtype).requires_grad_()
          for n in (70001, 5000, 4100)]
    opt = fused_optim.AdamW(ps, lr=0.01, state_dtype=torch.uint8)
    for step in range(3):
        for p in ps:
            p.grad = (torch.randn(p.shape, generator=g) * torch.logspace(-8, 1, p.numel())).to(dtype)
        opt.step()
    out[("AdamW 8-bit", str(dtype))] = [p.detach().clone() for p in ps] + [
        v for p in ps for v in opt.state[p].values()]
torch.save(out, sys.argv[1])""")
# (Adafactor's waves too, Note [Adafactor's waves]: one wave for the group, the default,
# one param a wave, and waves that put the small params together but the big one alone.)
TUNINGS = {
    "plain": dict(FUSED_OPTIM_PREFETCH="off", FUSED_OPTIM_GATHER_PREFETCH="off",
                  FUSED_OPTIM_ADAFACTOR_WAVE="off", FUSED_OPTIM_Q8_CODES="gather",
                  FUSED_OPTIM_FLOAT_LOOPS="avx512"),
    "xeon": dict(FUSED_OPTIM_PREFETCH="384", FUSED_OPTIM_GATHER_PREFETCH="on",
                 FUSED_OPTIM_ADAFACTOR_WAVE="auto", FUSED_OPTIM_Q8_CODES="arithmetic",
                 FUSED_OPTIM_FLOAT_LOOPS="avx2-load-bound"),
    "near": dict(FUSED_OPTIM_PREFETCH="5", FUSED_OPTIM_GATHER_PREFETCH="on",
                 FUSED_OPTIM_ADAFACTOR_WAVE="1", FUSED_OPTIM_Q8_CODES="gather",
                 FUSED_OPTIM_FLOAT_LOOPS="avx2"),
    "far": dict(FUSED_OPTIM_PREFETCH="100000", FUSED_OPTIM_GATHER_PREFETCH="off",
                FUSED_OPTIM_ADAFACTOR_WAVE="300000", FUSED_OPTIM_Q8_CODES="arithmetic",
                FUSED_OPTIM_FLOAT_LOOPS="avx512"),
}


def test_bitwise_identical_across_cpu_tunings(tmp_path):
    script = TUNING_SCRIPT.format(tests=os.path.dirname(__file__))
    results = {}
    for name, env in TUNINGS.items():
        out = tmp_path / f"{name}.pt"
        subprocess.run([sys.executable, "-c", script, str(out)], env=dict(os.environ, **env),
                       check=True, timeout=300)
        results[name] = torch.load(out)
        tuning = results[name].pop("tuning")
        results[name].pop("isa")
        distance = env["FUSED_OPTIM_PREFETCH"]
        assert re.match(f"prefetch {distance}[ ,]", tuning), tuning  # the forced choice ran
        assert ("gather prefetch off" in tuning) == (env["FUSED_OPTIM_GATHER_PREFETCH"] == "off")
        assert ("8-bit codes by arithmetic" in tuning) == (env["FUSED_OPTIM_Q8_CODES"] == "arithmetic")
        loops = {"avx512": "", "avx2": ", float loops in AVX2",
                 "avx2-load-bound": ", load-bound float loops in AVX2"}
        assert ("float loops in AVX2" in tuning) == (env["FUSED_OPTIM_FLOAT_LOOPS"] != "avx512")
        assert loops[env["FUSED_OPTIM_FLOAT_LOOPS"]] + " (" in tuning
    for name in list(TUNINGS)[1:]:
        for case, tensors in results["plain"].items():
            for a, b in zip(tensors, results[name][case]):
                assert torch.equal(a, b), f"{case}: tuning {name} differs from the plain stream"


@pytest.mark.parametrize("var,value", [("FUSED_OPTIM_PREFETCH", "far"),
                                       ("FUSED_OPTIM_PREFETCH", "-3"),
                                       ("FUSED_OPTIM_GATHER_PREFETCH", "yes"),
                                       ("FUSED_OPTIM_Q8_CODES", "table"),
                                       ("FUSED_OPTIM_FLOAT_LOOPS", "avx2-all"),
                                       ("FUSED_OPTIM_ISA", "sse")])
def test_a_bad_tuning_variable_is_a_clear_error(var, value):
    # (FUSED_OPTIM_ISA's message named its values but not auto, which the others name and
    # it takes: 2026-12-06)
    out = subprocess.run([sys.executable, "-c", "import torch, fused_optim; "
                          "print(torch.ops.fused_optim._cpu_tuning(), "
                          "torch.ops.fused_optim._cpu_isa())"],
                         env=dict(os.environ, **{var: value}), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0 and f"{var} must be auto" in out.stderr and value in out.stderr


_BAD_VARIABLE_SCRIPT = """
import os, sys, torch, fused_optim
p = torch.nn.Parameter(torch.zeros(1000)); q = torch.nn.Parameter(torch.zeros(1000))
opts = [fused_optim.Adam([p], lr=0.1), fused_optim.Adagrad([q], lr=0.1)]
os.environ[sys.argv[1]] = sys.argv[2]  # (set after import and construction)
for opt, x in zip(opts, (p, q)):
    x.grad = torch.ones(1000)
    try:
        opt.step()
    except RuntimeError as e:
        assert sys.argv[1] in str(e), e
    else:
        raise AssertionError("stepped")
    state = opt.state.get(x, {})
    assert float(state.get("step", 0)) == 0 and not any(
        v.any() for k, v in state.items() if k != "step" and k != "sum"), state
    assert not x.detach().any()
print("ok")
"""


@pytest.mark.parametrize("var,value", [("FUSED_OPTIM_ISA", "sse"),
                                       ("FUSED_OPTIM_PREFETCH", "far")])
def test_a_bad_tuning_variable_raises_before_a_step_is_counted(var, value):
    """A bad FUSED_OPTIM_ISA raised after the kernel had counted the step (Adam's first
    step, Adagrad's fast path: found by a review, 2026-12-05): a program that caught the
    error and went on had its bias corrections a step ahead. Now the choices are made
    before anything changes."""
    out = subprocess.run([sys.executable, "-c", _BAD_VARIABLE_SCRIPT, var, value],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_default_tuning_names_the_cpu_and_how_it_was_chosen():
    if any(os.environ.get(v) for v in ("FUSED_OPTIM_PREFETCH", "FUSED_OPTIM_GATHER_PREFETCH",
                                       "FUSED_OPTIM_Q8_CODES", "FUSED_OPTIM_FLOAT_LOOPS")):
        pytest.skip("a tuning variable is set")
    tuning = torch.ops.fused_optim._cpu_tuning()
    # e.g. "prefetch off (AMD Zen 4, table)", "prefetch 384 (Intel Xeon with AVX512-BF16,
    # table)", "prefetch off (GenuineIntel family 6 model 85 (not in the table), default)"
    assert re.fullmatch(r"prefetch (off|\d+)(, gather prefetch off)?(, 8-bit codes by arithmetic)?"
                        r"(, (load-bound )?float loops in AVX2)? \(.+, (table|default)\)", tuning), tuning
    info = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    model = re.search(r"^model\s*: (\d+)$", info, flags=re.M)
    if "AuthenticAMD" in info and re.search(r"cpu family\s*: 25\n", info) and " avx512f" in info \
            and model and (0x10 <= int(model.group(1)) <= 0x1F or 0x60 <= int(model.group(1)) <= 0xAF):
        # (the table's Zen 4 models: a family-25 CPU with AVX-512 that a VM reports with
        # another model number gets the default)
        # measured: Note [CPU tuning]
        assert tuning == "prefetch off, 8-bit codes by arithmetic (AMD Zen 4, table)"
    if "AuthenticAMD" in info and re.search(r"cpu family\s*: 26\n", info) and model \
            and int(model.group(1)) <= 0x7F:
        # measured: Note [CPU tuning]
        assert tuning == ("prefetch off, 8-bit codes by arithmetic, load-bound float loops in AVX2 "
                          "(AMD Zen 5, table)")


def _set_cpu_tuning(settings):
    torch.ops.fused_optim._set_cpu_tuning(settings)


def test_the_tuning_set_inside_a_process_is_what_the_variables_would_choose():
    """bench.py --tuning times the choices in one process (cpu/tuning.h's set_cpu_tuning):
    the tuning it sets is the one the same variables give a fresh process, an empty list
    restores the process's own, and a bad setting raises the variable's own error and
    changes nothing."""
    own = torch.ops.fused_optim._cpu_tuning()
    try:
        for name, env in TUNINGS.items():
            settings = [f"{k}={v}" for k, v in env.items() if k != "FUSED_OPTIM_ADAFACTOR_WAVE"]
            _set_cpu_tuning(settings)
            fresh = subprocess.run([sys.executable, "-c", "import torch, fused_optim; "
                                    "print(torch.ops.fused_optim._cpu_tuning())"],
                                   env=dict(os.environ, **env), capture_output=True, text=True,
                                   timeout=120, check=True).stdout.strip()
            assert torch.ops.fused_optim._cpu_tuning() == fresh, name
        _set_cpu_tuning([])
        assert torch.ops.fused_optim._cpu_tuning() == own
        _set_cpu_tuning(["FUSED_OPTIM_PREFETCH=77"])
        changed = torch.ops.fused_optim._cpu_tuning()
        assert changed.startswith("prefetch 77") and "FUSED_OPTIM_PREFETCH" in changed
        for bad, message in ((["FUSED_OPTIM_PREFETCH=far"], "FUSED_OPTIM_PREFETCH must be auto, off or"),
                             (["FUSED_OPTIM_Q8_CODES=arithmetic", "FUSED_OPTIM_FLOAT_LOOPS=sse"],
                              "FUSED_OPTIM_FLOAT_LOOPS must be auto, avx512"),
                             (["PREFETCH=3"], "a CPU tuning setting is NAME=VALUE"),
                             (["FUSED_OPTIM_ISA=avx2"], "a CPU tuning setting is NAME=VALUE"),
                             # (a repeated name: the bad first value was taken over by the
                             # second: found by a review, 2026-12-07)
                             (["FUSED_OPTIM_PREFETCH=far", "FUSED_OPTIM_PREFETCH=384"],
                              "names FUSED_OPTIM_PREFETCH twice")):
            with pytest.raises(RuntimeError, match=re.escape(message)):
                _set_cpu_tuning(bad)
            assert torch.ops.fused_optim._cpu_tuning() == changed, bad
        # The process's own choice is the environment's at its first step: a later change
        # of the environment changes neither it nor what an empty list restores (found by
        # the same review).
        var = "FUSED_OPTIM_Q8_CODES"
        saved = os.environ.get(var)
        os.environ[var] = "bogus"
        try:
            _set_cpu_tuning([])
            assert torch.ops.fused_optim._cpu_tuning() == own
            _set_cpu_tuning(["FUSED_OPTIM_PREFETCH=77"])
            assert torch.ops.fused_optim._cpu_tuning() == changed
        finally:
            if saved is None:
                del os.environ[var]
            else:
                os.environ[var] = saved
        if not os.environ.get("FUSED_OPTIM_PREFETCH"):
            _set_cpu_tuning(["FUSED_OPTIM_PREFETCH=auto"])  # (auto: the table's, here the own)
            assert torch.ops.fused_optim._cpu_tuning() == own
    finally:
        _set_cpu_tuning([])


def test_switching_the_tuning_between_steps_changes_no_bit():
    """The same training with the tuning switched before every step (through each of
    TUNINGS' choices in turn) and with the process's own: bitwise the same, for float32,
    bfloat16 and float16 params of many small tensors and one large one (the prefetches
    run across tensor boundaries) and for 8-bit moments."""
    def train(switch):
        g = torch.Generator().manual_seed(3)
        out = []
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            ps = [torch.randn(int(n), generator=g).to(dtype).requires_grad_()
                  for n in torch.randint(1, 3000, (200,), generator=g).tolist() + [300_000]]
            for name, kw in (("Adam", {}), ("SGD", dict(momentum=0.9)),
                             ("AdamW", dict(state_dtype=torch.uint8))):
                if name == "AdamW" and dtype == torch.float16:
                    continue
                opt = getattr(fused_optim, name)(ps, lr=0.01, **kw)
                for step in range(len(TUNINGS)):
                    for p in ps:
                        p.grad = torch.randn(p.shape, generator=g).to(dtype)
                    if switch:
                        env = list(TUNINGS.values())[step]
                        _set_cpu_tuning([f"{k}={v}" for k, v in env.items()
                                         if k != "FUSED_OPTIM_ADAFACTOR_WAVE"])
                    try:
                        opt.step()
                    finally:
                        _set_cpu_tuning([])
                out += [p.detach().clone() for p in ps]
                out += [v for p in ps for v in opt.state[p].values()]
        return out
    for a, b in zip(train(False), train(True), strict=True):
        assert torch.equal(a, b)


# Every bit pattern of a 16-bit dtype (NaNs of each sign and payload, infinities,
# subnormals, the largest finite values) as params, grads and so states, for every
# algorithm and option that changes the loop, and the GradScaler path (grads unscaled and
# stored back). The results are float values of every kind, rounded on every store.
BITS16_SCRIPT = r"""
import sys, torch, fused_optim
every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(getattr(torch, sys.argv[2]))
gen = torch.Generator().manual_seed(0)
def shuffled():
    return every[torch.randperm(every.numel(), generator=gen)]
# One tensor of all 65,536 patterns and one of 16 * 3 + 5 (vectors and a scalar tail).
def params():
    return [shuffled().requires_grad_(), shuffled()[:53].clone().requires_grad_()]
if len(sys.argv) > 3:  # "daz": flush denormals (FTZ and DAZ), on the one thread that runs
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
# (Adam's betas[0] = 0.3 and RMSprop's alpha = 0.3 take lerp's weight >= 0.5 branch.)
cases = [("SGD", dict(lr=0.3)), ("SGD", dict(lr=0.3, momentum=0.9, nesterov=True, weight_decay=0.01)),
         ("SGD", dict(lr=0.3, momentum=0.9, dampening=0.2, maximize=True)),
         ("Adam", dict(lr=0.01, amsgrad=True, weight_decay=0.1)), ("Adam", dict(lr=0.01, maximize=True)),
         ("Adam", dict(lr=0.01, betas=(0.3, 0.5), amsgrad=True)),
         ("AdamW", dict(lr=0.01, betas=(0.6, 0.7))), ("AdamW", dict(lr=0.01, amsgrad=True)),
         ("RMSprop", dict(lr=0.01, momentum=0.9, centered=True, weight_decay=0.1)),
         ("RMSprop", dict(lr=0.01, alpha=0.3, centered=True)),
         ("Adagrad", dict(lr=0.05, lr_decay=0.01, weight_decay=0.1)),
         ("Adamax", dict(lr=0.01, weight_decay=0.1)), ("Adamax", dict(lr=0.01, betas=(0.3, 0.5), maximize=True)),
         ("Adadelta", dict(lr=0.5, weight_decay=0.1)), ("Adadelta", dict(rho=0.3, maximize=True)),
         ("NAdam", dict(lr=0.01, weight_decay=0.1)),
         ("NAdam", dict(lr=0.01, betas=(0.3, 0.5), weight_decay=0.1, decoupled_weight_decay=True)),
         ("RAdam", dict(lr=0.01, weight_decay=0.1)), ("RAdam", dict(lr=0.01, betas=(0.3, 0.5))),
         ("Rprop", dict(lr=0.01)), ("Rprop", dict(lr=0.01, step_sizes=(5e-3, 0.02), maximize=True)),
         ("ASGD", dict(lr=0.01, t0=1.0, weight_decay=0.1)), ("ASGD", dict(lr=0.01, maximize=True))]
out = {"isa": torch.ops.fused_optim._cpu_isa()}
for i, (name, kwargs) in enumerate(cases):
    ps = params()
    opt = getattr(fused_optim, name)(ps, **kwargs)
    for step in range(3):
        for p in ps:
            p.grad = shuffled()[:p.numel()].clone()
        opt.step()
        if step == 0:  # then every state holds every pattern too (an amsgrad max a subnormal...)
            for p in ps:
                for k, v in opt.state[p].items():
                    if k != "step":
                        v.copy_(shuffled()[:v.numel()].view(v.shape))  # mu_product: 0-dim
    out[i] = [p.detach() for p in ps] + [v for p in ps for v in opt.state[p].values()]
# GradScaler's path: the op unscales the grads (by a scale that is not a power of two, so
# the quotients round) and stores them back before the update.
ps, gs, bufs = params(), [shuffled()[:n].clone() for n in (65536, 53)], [shuffled()[:n].clone() for n in (65536, 53)]
torch.ops.fused_optim.sgd_(ps, gs, bufs, lr=0.3, momentum=0.9, dampening=0.0, weight_decay=0.0,
                           nesterov=False, maximize=False, is_first_step=False,
                           grad_scale=torch.tensor(3.0), found_inf=torch.tensor(0.0))
out["unscaled"] = [t.detach() for t in ps + gs + bufs]
torch.save(out, sys.argv[1])
"""


@pytest.mark.parametrize("flush", ["", "daz"], ids=["ieee", "flush_denormal"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16bit_rounding_identical_across_isas_on_every_bit_pattern(tmp_path, dtype, flush):
    """Note [vector rules]: AVX512-BF16's rounding with c10's fix-ups (NaN, subnormals) gives
    the baseline loops' bits on every bfloat16 input; F16C's rounding gives them on every
    float16 input; also with denormals flushed (torch.set_flush_denormal)."""
    results = _run_isas(BITS16_SCRIPT, tmp_path, dtype, *([flush] if flush else []))
    for isa in ISAS[1:]:
        for case, tensors in results["baseline"].items():
            for a, b in zip(tensors, results[isa][case]):
                if a.dtype == getattr(torch, dtype):  # bitwise, NaN payloads included: raw bits
                    a, b = a.view(torch.int16), b.view(torch.int16)
                    if dtype == "float16":
                        # Where two NaNs meet, which sign survives is the compiler's choice
                        # (Note [vector rules]); every NaN still has c10's payload, 0x7E00.
                        nan = (a & 0x7FFF) > 0x7C00
                        assert torch.equal(nan, (b & 0x7FFF) > 0x7C00), f"case {case}: {isa}"
                        assert ((a[nan] & 0x7FFF) == 0x7E00).all() and ((b[nan] & 0x7FFF) == 0x7E00).all()
                        a, b = a[~nan], b[~nan]
                # (else a step count, or a scalar state: NAdam's mu_product, NaN after a NaN)
                torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True,
                                           msg=f"case {case}: {isa}")
    # The inputs did reach the special cases on the stores: NaNs (of other payloads than
    # c10's 0x7FC0 in the inputs), subnormals and infinities in the results.
    stored = torch.cat([t.float().flatten() for ts in results["baseline"].values() for t in ts])
    assert stored.isnan().any() and stored.isinf().any()
    assert ((stored != 0) & (stored.abs() < torch.finfo(getattr(torch, dtype)).tiny)).any()


# Note [division by a bias correction] (cpu/simd.h): NAdam's 16-bit vector loops divide
# exp_avg_sq by bias_correction2 with a multiply and a correction where exp_avg_sq is in
# the domain that makes it exact, and divide elsewhere. Every non-negative 16-bit pattern
# as exp_avg_sq, in ascending order (so that most vectors are wholly inside the domain and
# take the multiply, and a few straddle its ends), for bias corrections from 1 down to
# 2^-23 (beta2 up to 1 - 2^-23, steps 1 to 9).
NADAM_DIVISION_SCRIPT = r"""
import sys, torch, fused_optim
dt = getattr(torch, sys.argv[2])
every = torch.arange(0, 32768, dtype=torch.int32).to(torch.int16).view(dt)  # +0 .. +NaN
gen = torch.Generator().manual_seed(0)
out = {"isa": torch.ops.fused_optim._cpu_isa()}
for beta2 in (0.0, 0.5, 0.999, 1 - 2.0 ** -23):
    for step in range(1, 10, 2):
        p = torch.randn(every.numel(), generator=gen).to(dt).requires_grad_()
        p.grad = (torch.randn(every.numel(), generator=gen) * 1e-3).to(dt)
        opt = fused_optim.NAdam([p], lr=0.01, betas=(0.9, beta2))
        opt.step()  # makes the state; then this step's inputs
        with torch.no_grad():
            p.copy_(torch.randn(every.numel(), generator=gen).to(dt))
        st = opt.state[p]
        st["exp_avg_sq"].copy_(every)
        st["exp_avg"].copy_(torch.randn(every.numel(), generator=gen).to(dt))
        st["step"].fill_(step - 1)
        opt.step()
        out[(beta2, step)] = [p.detach().clone(), st["exp_avg"].clone(), st["exp_avg_sq"].clone()]
torch.save(out, sys.argv[1])
"""


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_nadam_division_by_bias_correction_identical_across_isas(tmp_path, dtype):
    """NAdam's exp_avg_sq / bias_correction2 without a divider (Note [division by a bias
    correction]) stores the division's bits: every ISA's loops the same as the baseline's,
    whose division is IEEE's, on every non-negative exp_avg_sq pattern."""
    results = _run_isas(NADAM_DIVISION_SCRIPT, tmp_path, dtype)
    assert len(results["baseline"]) == 20
    for isa in ISAS[1:]:
        for case, tensors in results["baseline"].items():
            for a, b in zip(tensors, results[isa][case]):
                # bitwise, NaN payloads included (the param of an exp_avg_sq NaN is NaN)
                assert torch.equal(a.view(torch.int16), b.view(torch.int16)), f"{case}: {isa}"
    # The results moved: the update is not zero where exp_avg_sq is in the domain.
    a, _, _ = results["baseline"][(0.999, 1)]
    assert a.isfinite().sum() > 20000


# The storage loops (Note [param storage] and Note [state storage] in plan.h) run the rules
# on vectors too and round bfloat16 blocks with vcvtneps2bf16 where the CPU has it: every
# algorithm with each mode, on every bit pattern of the param's dtype, as params, grads
# and every state (the master copy, the compensation, the moments), every ISA's bits the
# baseline's; also with denormals flushed.
STORAGE_SCRIPT = r"""
import sys, torch, fused_optim
torch.manual_seed(0)  # (stochastic rounding's stream is seeded from torch's generator)
dt = getattr(torch, sys.argv[2])
every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dt)
gen = torch.Generator().manual_seed(0)
def shuffled():
    return every[torch.randperm(every.numel(), generator=gen)]
if len(sys.argv) > 3:
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
cases = [("SGD", dict(lr=0.3, momentum=0.9)), ("Adam", dict(lr=0.01, amsgrad=True)),
         ("AdamW", dict(lr=0.01, betas=(0.3, 0.5))), ("RMSprop", dict(lr=0.01, centered=True)),
         ("Adagrad", dict(lr=0.05)), ("Adamax", dict(lr=0.01)), ("Adadelta", dict(lr=0.5)),
         ("NAdam", dict(lr=0.01)), ("RAdam", dict(lr=0.01)), ("Rprop", dict(lr=0.01)),
         ("ASGD", dict(lr=0.01))]
# (and float32 moments beside the 16-bit params; then float32 params, holding every value of
# the 16-bit dtype, with moments of that dtype: Note [storage modes in registers] too)
modes = [dict(kahan_summation=True), dict(stochastic_rounding=True), dict(master_weights=True),
         dict(state_dtype=torch.float32), dict(state_dtype=dt, float32_params=True)]
out = {"isa": torch.ops.fused_optim._cpu_isa()}
for name, kwargs in cases:
    for m, mode in enumerate(modes):
        mode = dict(mode)
        if "state_dtype" in mode and name in ("Rprop", "ASGD"):
            continue  # (no moments: state_dtype does not apply)
        pdt = torch.float32 if mode.pop("float32_params", False) else dt
        ps = [shuffled().to(pdt).requires_grad_(), shuffled()[:53].to(pdt).requires_grad_()]
        opt = getattr(fused_optim, name)(ps, **kwargs, **mode)
        for step in range(3):
            for p in ps:
                p.grad = shuffled()[:p.numel()].to(pdt)
            opt.step()
            if step == 0:
                for p in ps:
                    for k, v in opt.state[p].items():
                        if k != "step" and v.numel() == p.numel():
                            v.copy_(shuffled()[:v.numel()].view(v.shape))
        out[(name, m)] = [p.detach() for p in ps] + [
            v for p in ps for v in opt.state[p].values() if torch.is_tensor(v)]
torch.save(out, sys.argv[1])
"""


@pytest.mark.parametrize("flush", ["", "daz"], ids=["ieee", "flush_denormal"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_storage_modes_identical_across_isas_on_every_bit_pattern(tmp_path, dtype, flush):
    """Kahan summation, stochastic rounding and master weights, and moments of another
    dtype than the param's (float32 beside 16-bit params, 16-bit beside float32 ones): the
    vector loops of every ISA store the baseline's bits on every 16-bit input, for every
    algorithm."""
    results = _run_isas(STORAGE_SCRIPT, tmp_path, dtype, *([flush] if flush else []))
    assert len(results["baseline"]) == 11 * 3 + 9 * 2  # (Rprop and ASGD have no moments)
    for isa in ISAS[1:]:
        for case, tensors in results["baseline"].items():
            for a, b in zip(tensors, results[isa][case]):
                if a.dtype in (torch.bfloat16, torch.float16, torch.float32):
                    # raw bits, NaNs included; where two NaNs meet, which sign survives is
                    # the compiler's choice (Note [vector rules]): compared without it
                    ai = a.view(torch.int16 if a.element_size() == 2 else torch.int32)
                    bi = b.view(ai.dtype)
                    nan = a.isnan()
                    assert torch.equal(nan, b.isnan()), f"{case}: {isa}"
                    assert torch.equal(ai[~nan], bi[~nan]), f"{case}: {isa}"
                else:
                    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


# Note [master follows the param]: a master that rounds to its float16 param's NaN (c10
# stores every NaN as sign | 0x7E00) is kept, NaN payload and all, by every ISA's loop and
# in every position (vectors and tail), as the baseline's scalar check keeps it.
NAN_MASTER_SCRIPT = r"""
import sys, torch, fused_optim
p = torch.zeros(37, dtype=torch.float16, requires_grad=True)
opt = fused_optim.SGD([p], lr=0.1, master_weights=True)
g = torch.ones(37, dtype=torch.float16)
g.view(torch.int16)[::2] = 0x7F00  # NaNs with a payload: the masters' NaNs keep it
g.view(torch.int16)[1::4] = -0x0100  # (0xFF00: with the sign too)
p.grad = g
opt.step()
p.grad = torch.ones(37, dtype=torch.float16)
opt.step()
torch.save({"isa": torch.ops.fused_optim._cpu_isa(), "param": p.detach().view(torch.int16),
            "master": opt.state[p]["master_param"].view(torch.int32)}, sys.argv[1])
"""


def test_nan_masters_keep_their_bits_in_every_isa(tmp_path):
    results = _run_isas(NAN_MASTER_SCRIPT, tmp_path)
    base = results["baseline"]
    assert base["master"].view(torch.float32).isnan().sum() == 28  # (the test's premise)
    for isa in ISAS[1:]:
        for key in ("param", "master"):
            assert torch.equal(results[isa][key], base[key]), f"{key}: {isa}"


def test_avx512bf16_loops_run_where_the_cpu_has_them():
    """Guards the test above: on a CPU with AVX512-BF16 its copy of the loops is the default."""
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if " avx512_bf16" not in flags or os.environ.get("FUSED_OPTIM_ISA"):
        pytest.skip("no AVX512-BF16 on this CPU (or FUSED_OPTIM_ISA caps it)")
    assert torch.ops.fused_optim._cpu_isa() == "avx512bf16"


def test_bad_input_changes_nothing():
    """A kernel that rejects its input has changed nothing: checks come before updates."""
    good = torch.randn(10)
    bad = torch.randn(4)
    ps, grads = [good.clone(), bad.clone()], [torch.randn(10), torch.randn(5)]  # shape mismatch
    ms, vs = [torch.zeros(10), torch.zeros(4)], [torch.zeros(10), torch.zeros(4)]
    steps = [torch.tensor(0.0), torch.tensor(0.0)]
    with pytest.raises(RuntimeError, match=r"grads\[1\] has shape \[5\] but its param has shape \[4\]"):
        torch.ops.fused_optim.adam_(ps, grads, ms, vs, [], steps, lr=0.1, beta1=0.9, beta2=0.999,
                                    weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False,
                                    decoupled_weight_decay=False)
    assert torch.equal(ps[0], good) and torch.equal(ms[0], torch.zeros(10))
    assert steps[0].item() == 0.0
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.fused_optim.sgd_([good.clone()], [torch.randn(10, dtype=torch.float64)], [],
                                   lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0,
                                   nesterov=False, maximize=False, is_first_step=False)
    with pytest.raises(RuntimeError, match="supported: float64, float32"):
        torch.ops.fused_optim.sgd_([torch.zeros(3, dtype=torch.int64)],
                                   [torch.zeros(3, dtype=torch.int64)], [], lr=0.1, momentum=0.0,
                                   dampening=0.0, weight_decay=0.0, nesterov=False,
                                   maximize=False, is_first_step=False)


def _snapshot(opt, params):
    return [p.detach().clone() for p in params], [
        {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()} for p in params]


def _assert_unchanged(before, after):
    for a, b in zip(before[0], after[0]):
        assert torch.equal(a, b)
    for s, t in zip(before[1], after[1]):
        assert s.keys() == t.keys()
        for k in s:
            assert torch.equal(s[k], t[k]) if torch.is_tensor(s[k]) else s[k] == t[k], k


@pytest.mark.parametrize("name", pu.algos("Adam", "SGD", "RMSprop", "NAdam", "Muon"))
def test_an_error_in_a_later_group_changes_no_group(name):
    """Note [every group checked first] (csrc/plan.h): a step over several param groups
    whose second group's state is bad (a moment of another shape, put there by hand) raises
    before the first group is updated: its params, state and steps are as they were, and
    the same step, once the state is mended, runs once. (Adafactor and SparseAdam, which
    run group by group through the op, are not covered: docs/parity.md.)"""
    cls = getattr(fused_optim, name)
    kwargs = {"momentum": 0.9} if name in ("SGD", "RMSprop") else {}
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(4, 3, generator=g).requires_grad_() for _ in range(3)]
    opt = cls([{"params": params[:2]}, {"params": params[2:]}], lr=0.01, **kwargs)
    ref = getattr(torch.optim, name)([{"params": [p.detach().clone().requires_grad_() for p in params[:2]]},
                                      {"params": [params[2].detach().clone().requires_grad_()]}],
                                     lr=0.01, **kwargs)
    ref_params = [p for group in ref.param_groups for p in group["params"]]
    for step in range(2):
        grads = [torch.randn(4, 3, generator=g) for _ in params]
        for ps in (params, ref_params):
            for p, grad in zip(ps, grads):
                p.grad = grad.clone()
        if step == 1:
            state = opt.state[params[2]]
            key = next(k for k, v in state.items() if torch.is_tensor(v) and v.dim() == 2)
            good = state[key]
            state[key] = torch.zeros(5, 3)
            before = _snapshot(opt, params)
            with pytest.raises(RuntimeError, match="shape"):
                opt.step()
            _assert_unchanged(before, _snapshot(opt, params))
            state[key] = good
        opt.step()
        ref.step()
    for p, q in zip(params, ref_params):  # (one step each: within Muon's tolerance)
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_a_param_whose_dtype_a_mode_does_not_take_changes_nothing():
    """A param that became float32 after the optimizer was made (`module.float()` swaps
    the data of the same Parameter) in a later group of a master_weights optimizer: the
    step raises the constructor's ValueError, naming the param and its group, before the
    first group is updated (found by a review: group 0 was stepped, then the error named
    `params[0]`)."""
    a, b0, b1 = (torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16)) for _ in range(3))
    opt = fused_optim.SGD([{"params": [a]}, {"params": [b0, b1]}], lr=0.5, master_weights=True)
    for p in (a, b0, b1):
        p.grad = torch.ones_like(p)
    opt.step()
    b1.data = b1.data.float()
    b0.grad = None
    a.grad, b1.grad = torch.ones_like(a), torch.ones_like(b1)
    before = _snapshot(opt, [a])
    with pytest.raises(ValueError, match=r"master_weights=True applies to bfloat16 and float16 "
                                         r"params; param 1 of param group 1 has dtype torch.float32"):
        opt.step()
    _assert_unchanged(before, _snapshot(opt, [a]))


# The fallback to torch's own step (for what the kernels do not do: CUDA ASGD params, a
# capturable NAdam group, ...), in a fresh process: there torch's class has not been
# patched by an instance of its own (Optimizer._patch_step_function), so its step is one
# decorator over the raw function, the one that turns grad mode off. Found on a GPU, where
# every CUDA ASGD step raised "a leaf Variable that requires grad is being used in an
# in-place operation" unless a torch.optim.ASGD had been made before in the process.
_FALLBACK_SCRIPT = r"""
import sys, warnings
import torch, fused_optim
name = sys.argv[1]
warnings.simplefilter("ignore")
kwargs = {"lr": 0.1} if name != "Muon" else {"lr": 0.02}
def run(cls, fallback):
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(6, 5, generator=g))
    opt = cls([p], **kwargs)
    if fallback:
        opt._torch_step_reason = lambda: "a reason for the test"
    for step in range(3):
        p.grad = torch.randn(6, 5, generator=g)
        opt.step()
    assert torch.is_grad_enabled()  # (restored after the step)
    return p.detach()
ours = run(getattr(fused_optim, name), True)   # torch's step, before any torch instance
ref = run(getattr(torch.optim, name), False)
assert torch.equal(ours, ref), (ours - ref).abs().max()
print("ok")
"""


@pytest.mark.parametrize("name", ["SGD", "ASGD", "NAdam", "Adafactor", "Rprop"])
def test_torchs_step_runs_in_a_fresh_process(name):
    """The one-time-warning fallback runs torch's step as torch's decorators would (grad
    mode off), bitwise torch's own optimizer, with no torch optimizer made before it."""
    out = subprocess.run([sys.executable, "-c", _FALLBACK_SCRIPT, name], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
