"""The CUDA kernels, where a GPU and a CUDA build of fused_optim are present (skipped, and
reported as skipped, otherwise).

The contract (Note [CUDA bits] in csrc/cuda/multi_tensor.cuh): where lr and the steps live
on the host (the for-loop's usual state), a CUDA step computes every element exactly as
the CPU kernels do, so the whole parity suite's CPU results are the reference, bit for bit,
for every option, dtype and layout. Where the steps live on the device (capturable and
fused groups) the coefficients come from the GPU's pow, which may differ from the host's
in the last bit. Against torch.optim on CUDA, whose kernels round some ops differently
(a division by a Python scalar is a multiply by its reciprocal there), results agree to
a few ulps.
"""
import copy
import warnings

import pytest
import torch

import fused_optim
import parity_utils as pu
import test_adafactor as ta
import test_muon as tm
import test_param_storage
import test_sparse_adam as tsa
import test_state_dtype

pytestmark = pu.needs_cuda

CASES = [(algo, o) for algo, opts in pu.OPTIONS.items() for o in opts]
IDS = [f"{algo}[{pu.option_id(o)}]" for algo, o in CASES]
# (ASGD's steps, etas and mus stay on the GPU, as torch keeps them; the kernels work on a
# CPU copy of them: Note [ASGD's scalar states on CUDA] in csrc/cuda/asgd.cu)
KERNEL_CASES = CASES
KERNEL_IDS = [f"{a}[{pu.option_id(o)}]" for a, o in KERNEL_CASES]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "fp64", "bf16", "fp16"]


def to_cpu_trajectory(run):
    """(params, optimizer) of a CUDA run, with params and state moved to the CPU."""
    params, opt = run
    cpu_params = {n: p.detach().cpu() for n, p in params.items()}
    state = {n: {k: v.cpu() if torch.is_tensor(v) else v for k, v in opt.state.get(p, {}).items()}
             for n, p in params.items()}
    return cpu_params, state


def assert_cuda_equals_cpu(cuda_run, cpu_run, exact, msg, **tol):
    params, state = to_cpu_trajectory(cuda_run)
    ref_params, ref_opt = cpu_run
    ref_state = pu.state_of(ref_opt, ref_params)
    for name, ref in ref_params.items():
        pu.check(params[name], ref.detach(), exact, f"{msg} param {name}", **tol)
        assert state[name].keys() == ref_state[name].keys(), f"{msg} state keys of {name}"
        for key, value in ref_state[name].items():
            ours = state[name][key]
            assert ours.dtype == value.dtype, f"{msg} dtype of state {name}.{key}"
            if key == "step":  # the step counts are small integers: exact on any device
                assert ours.item() == value.item(), f"{msg} state {name}.step"
                continue
            pu.check(ours, value, exact, f"{msg} state {name}.{key}", **tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("algo,options", KERNEL_CASES, ids=KERNEL_IDS)
def test_cuda_bitwise_equal_to_cpu(algo, options, dtype):
    """Every option, dtype and layout of the parity suite, 10 steps: the CUDA kernels give
    the CPU kernels' bits (which the parity suite compares with torch.optim)."""
    _, ours_cls = pu.ALGOS[algo]
    cuda_run = pu.run(ours_cls, options, dtype, device="cuda")
    cpu_run = pu.run(ours_cls, options, dtype)
    assert_cuda_equals_cpu(cuda_run, cpu_run, True, f"{algo} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("algo,options", CASES, ids=IDS)
def test_cuda_matches_torch_for_loop_on_cuda(algo, options, dtype):
    """Against torch.optim's for-loop on the GPU: torch's CUDA kernels round a few ops
    differently from its CPU ones (a division by a Python scalar is a multiply by the
    reciprocal; addcdiv fuses its multiply-add), a few ulps per step, so torch.testing's
    default tolerances for the dtype hold over 10 steps (fp32: rtol 1.3e-6, atol 1e-5)."""
    torch_cls, ours_cls = pu.ALGOS[algo]
    ours = to_cpu_trajectory(pu.run(ours_cls, options, dtype, device="cuda"))
    ref_params, ref_opt = pu.run(torch_cls, options, dtype, device="cuda", foreach=False)
    ref_state = pu.state_of(ref_opt, ref_params)
    for name, ref in ref_params.items():
        pu.check(ours[0][name], ref.detach().cpu(), False, f"{algo} param {name}")
        for key, value in ref_state[name].items():
            pu.check(ours[1][name][key], value.cpu(), False, f"{algo} state {name}.{key}")


@pytest.mark.parametrize("flag", ["capturable", "fused"])
@pytest.mark.parametrize("algo", ["Adam", "AdamW"])
def test_device_steps_close_to_cpu(algo, flag):
    """capturable=True / fused=True keep the steps on the GPU (as torch does), and the
    kernels compute the bias corrections there: the GPU's double pow may differ from the
    host's in the last bit, which moves a float32 coefficient by at most an ulp, so the
    trajectory stays within torch.testing's float32 tolerances of the CPU run."""
    _, ours_cls = pu.ALGOS[algo]
    options = dict(lr=0.01, weight_decay=0.1, amsgrad=True)
    # torch's fused=True takes real floating params only
    names = [n for n in pu.fused_safe_layouts(torch.float32) if n != "complex"]
    cuda_run = pu.run(ours_cls, options, torch.float32, device="cuda", names=names,
                      **{flag: True})
    _, opt = cuda_run
    for p, s in opt.state.items():
        assert s["step"].device == p.device, "capturable/fused steps live on the param's device"
    cpu_run = pu.run(ours_cls, options, torch.float32, names=names)
    params, state = to_cpu_trajectory(cuda_run)
    ref_params, ref_opt = cpu_run
    ref_state = pu.state_of(ref_opt, ref_params)
    for name, ref in ref_params.items():
        pu.check(params[name], ref.detach(), False, f"param {name}")
        for key, value in ref_state[name].items():
            pu.check(state[name][key].to(value.dtype), value, False, f"state {name}.{key}")


def test_cuda_graph_capture_and_replay():
    """A capturable Adam step captured in a CUDA graph and replayed gives what eager steps
    give (the kernels read lr, steps and found_inf on the device: no host sync)."""
    torch.manual_seed(0)
    shapes = [(1000,), (33, 65), (7,), (2**16 + 3,)]
    params = [torch.randn(s, device="cuda", requires_grad=True) for s in shapes]
    eager = [p.detach().clone().requires_grad_() for p in params]
    opt = fused_optim.Adam(params, lr=torch.tensor(0.01, device="cuda"), capturable=True)
    ref = fused_optim.Adam(eager, lr=torch.tensor(0.01, device="cuda"), capturable=True)
    grads = [[torch.randn(s, device="cuda") for s in shapes] for _ in range(6)]
    # Warm up on a side stream (creates the state), as torch's CUDA graph docs do.
    for p, g in zip(params, grads[0]):
        p.grad = g.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for p, g in zip(eager, grads[0]):
        p.grad = g.clone()
    ref.step()
    for step in range(1, 6):
        for p, e, g in zip(params, eager, grads[step]):
            p.grad.copy_(g)
            e.grad = g.clone()
        graph.replay()
        ref.step()
    torch.cuda.synchronize()
    for p, e in zip(params, eager):
        assert torch.equal(p.detach(), e.detach())
    for p, e in zip(params, eager):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], ref.state[e][key])
    assert opt.state[params[0]]["step"].item() == 6


@pytest.mark.parametrize("algo", ["SGD", "Adam", "AdamW", "RMSprop", "Adagrad"])
def test_many_tensors_and_launches(algo):
    """More tensors than one launch holds (160, or 48 before CUDA 12.1), tensors of many
    chunks (16384 elements each) sharing a launch with one-chunk tensors (each block finds
    its tensor by a search of the launch's block_start table), an empty param among them
    (left out of the launches), params at different step counts (for Adam, AdamW and
    Adagrad, whose coefficients depend on the step: more coefficient sets than one launch
    holds): every launch boundary, bit for bit with the CPU (Note [CUDA launches])."""
    torch_cls, ours_cls = pu.ALGOS[algo]
    options = {"SGD": dict(lr=0.1, momentum=0.9), "RMSprop": dict(lr=0.01, momentum=0.5),
               "Adagrad": dict(lr=0.01, lr_decay=0.05)}.get(algo, dict(lr=0.01))
    gen = torch.Generator().manual_seed(0)
    shapes = [(int(n),) for n in torch.randint(1, 5000, (200,), generator=gen)]
    # multi-chunk tensors (exact multiples of a chunk and not), an empty param among them
    shapes[3:3] = [(3 * 16384 + 5,), (0,), (16384,), (16385,), (7,), (40, 1000)]
    shapes += [(300 * 16384 + 7,)]
    base = [torch.randn(s, generator=gen) for s in shapes]
    runs = {}
    for device in ("cpu", "cuda"):
        params = [b.to(device, copy=True).requires_grad_() for b in base]
        opt = ours_cls(params, **options)
        for step in range(11):
            for i, p in enumerate(params):
                # Every param steps twice (one coefficient set: launches fill up to the
                # tensor cap), then param i skips i % 9 steps: by the last steps, neighbours
                # are at up to 9 different step counts (more than the 4 coefficient sets a
                # launch holds)
                if step < 2 or step >= 2 + i % 9 or i == len(params) - 1:
                    g = torch.Generator().manual_seed(100 * step + i)
                    p.grad = torch.randn(p.shape, generator=g).to(device)
                else:
                    p.grad = None
            opt.step()
        runs[device] = (params, opt)
    (cpu_params, cpu_opt), (cuda_params, cuda_opt) = runs["cpu"], runs["cuda"]
    for i, (a, b) in enumerate(zip(cpu_params, cuda_params)):
        assert torch.equal(a.detach(), b.detach().cpu()), f"param {i}"
        for key, value in cpu_opt.state[a].items():
            assert torch.equal(value, cuda_opt.state[b][key].cpu()), f"state {i}.{key}"


DEVICE_SCALAR_CASES = {
    # (algo, options, constructor flags): lr or steps on the GPU, read by the kernels
    "SGD-cuda-lr": ("SGD", dict(momentum=0.9, weight_decay=0.1), {}),
    "RMSprop-cuda-lr": ("RMSprop", dict(momentum=0.5, centered=True), {}),
    "RMSprop-capturable": ("RMSprop", dict(momentum=0.5), dict(capturable=True)),
    "Adagrad-fused": ("Adagrad", dict(lr_decay=0.05, weight_decay=0.1), dict(fused=True)),
    "Adagrad-cuda-lr": ("Adagrad", dict(lr_decay=0.05), {}),
}


@pytest.mark.parametrize("case", list(DEVICE_SCALAR_CASES))
def test_device_scalars_bitwise_equal_to_cpu(case):
    """A CUDA Tensor lr, and steps on the GPU (capturable / fused groups), are read by the
    kernels. Where no pow is involved (SGD, RMSprop, Adagrad's lr decay is a double
    division, IEEE on both sides) the result is still the CPU kernels' bits, with the CPU
    run given the same lr as a float32 CPU tensor."""
    algo, options, flags = DEVICE_SCALAR_CASES[case]
    _, ours_cls = pu.ALGOS[algo]
    names = [n for n in pu.fused_safe_layouts(torch.float32) if n != "complex"]

    def run(device):
        params = pu.make_model(torch.float32, names=names, device=device)
        # a float32 Tensor lr on the run's device (the CPU run's is read on the host), or
        # the float lr for the cases about device steps
        lr = torch.tensor(0.01, device=device) if "cuda-lr" in case else 0.01
        opt = ours_cls(list(params.values()), lr=lr, **options,
                       **(flags if device == "cuda" else {}))
        for step in range(6):
            pu.set_grads(params, torch.float32, step)
            opt.step()
        return params, opt

    cuda_run, cpu_run = run("cuda"), run("cpu")
    if flags:
        for p, s in cuda_run[1].state.items():
            assert s["step"].device == p.device, "the steps of this group live on the GPU"
    assert_cuda_equals_cpu(cuda_run, cpu_run, True, case)


def test_capturable_adam_with_grad_scaler():
    """Capturable Adam under GradScaler: grad_scale and found_inf are read on the GPU, and a
    step with an inf grad changes nothing (the step kernel leaves the steps alone). Against
    the CPU kernels within float32 tolerances (the bias corrections use the GPU's pow)."""
    results = {}
    for device in ("cpu", "cuda"):
        w = torch.randn(300, generator=torch.Generator().manual_seed(0)).to(device)
        w.requires_grad_()
        flags = dict(capturable=True) if device == "cuda" else {}
        opt = fused_optim.Adam([w], lr=0.01, **flags)
        opt._step_supports_amp_scaling = True  # (Note [GradScaler's handoff])
        scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
        for step in range(5):
            opt.zero_grad()
            x = torch.randn(300, generator=torch.Generator().manual_seed(step)).to(device)
            if step == 2:
                x[5] = float("inf")
            scaler.scale((w * x).sum()).backward()
            scaler.step(opt)
            scaler.update()
        results[device] = (w, opt)
    (cpu_w, cpu_opt), (cuda_w, cuda_opt) = results["cpu"], results["cuda"]
    assert cuda_opt.state[cuda_w]["step"].device == cuda_w.device
    assert cuda_opt.state[cuda_w]["step"].item() == cpu_opt.state[cpu_w]["step"].item() == 4
    torch.testing.assert_close(cuda_w.detach().cpu(), cpu_w.detach())
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(cuda_opt.state[cuda_w][key].cpu(), cpu_opt.state[cpu_w][key])


def test_mixed_devices_with_grad_scaler():
    """A group with a CPU and a CUDA param, given grad_scale and found_inf on the GPU (what
    GradScaler("cuda").step hands an optimizer with _step_supports_amp_scaling): the CPU
    param's call gets them on the CPU (else the dispatcher would pick the CUDA kernel for
    it), a step with found_inf set changes nothing on either device, and params, unscaled
    grads and step counts are bit for bit an all-CPU run's.

    The scaler's tensors are set by hand, as GradScaler.step sets them, because GradScaler
    itself races on CPU grads: it copies its GPU scale to the CPU with
    to("cpu", non_blocking=True) (_MultiDeviceReplicator in torch/amp/grad_scaler.py), which
    returns pinned memory that the copy has not filled yet when the CPU unscale reads it.
    On an H100 under load (the CUDA suite in 12 processes) the CPU grads came out multiplied
    by stale values (0 on the first step), whichever optimizer runs next."""
    schedule = [(256.0, 0.0), (256.0, 1.0), (128.0, 0.0), (128.0, 0.0)]  # (scale, found_inf)
    results = {}
    for mixed in (True, False):
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(50, generator=gen).requires_grad_()
        b = torch.randn(50, generator=gen)
        b = (b.cuda() if mixed else b).requires_grad_()
        opt = fused_optim.AdamW([a, b], lr=0.01)
        grads = []
        for step, (scale, inf) in enumerate(schedule):
            gen = torch.Generator().manual_seed(step)
            # scaled grads, as backward() of a scaled loss makes them (x 2^k: exact)
            a.grad = torch.randn(50, generator=gen) * scale
            b.grad = (torch.randn(50, generator=gen) * scale).to(b.device)
            opt.grad_scale = torch.tensor(scale, device=b.device)
            opt.found_inf = torch.tensor(inf, device=b.device)
            before = (a.detach().clone(), b.detach().cpu().clone())
            opt.step()
            del opt.grad_scale, opt.found_inf
            if inf:  # the skipped step changes no param on either device
                assert torch.equal(a.detach(), before[0]) and torch.equal(b.detach().cpu(), before[1])
            grads.append((a.grad.clone(), b.grad.cpu().clone()))
        results[mixed] = (a, b, opt, grads)
    (a1, b1, o1, g1), (a0, b0, o0, g0) = results[True], results[False]
    assert torch.equal(a1.detach(), a0.detach())
    assert torch.equal(b1.detach().cpu(), b0.detach())
    for step, ((ga1, gb1), (ga0, gb0)) in enumerate(zip(g1, g0)):
        assert torch.equal(ga1, ga0), f"CPU grad after step {step}"
        assert torch.equal(gb1, gb0), f"CUDA grad after step {step}"
    assert o1.state[a1]["step"].item() == o0.state[a0]["step"].item() == 3
    assert o1.state[b1]["step"].item() == o0.state[b0]["step"].item() == 3


@pytest.mark.parametrize("algo", ["SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "NAdam",
                                  "RAdam", "Adamax", "Adadelta", "ASGD"])
def test_compiled_step_with_scheduler_on_cuda(algo):
    """torch.compile (aot_eager: no Triton needed) of a step and an LR scheduler driving a
    CUDA Tensor lr gives what the eager step gives. While tracing, torch marks groups
    capturable, so the compiled step keeps its steps on the GPU and computes the bias
    corrections there (the GPU's pow: last-bit differences), hence torch.testing's float32
    tolerances. NAdam's and ASGD's kernels compute their scalar states on the host, so
    their compiled CUDA step is torch's (before, the kernel refused the GPU steps the traced
    step had made: a review, 2026-12-06)."""
    import torch._dynamo

    _, ours_cls = pu.ALGOS[algo]
    extra = dict(momentum=0.9) if algo in ("SGD", "RMSprop") else {}

    def run(compiled):
        torch._dynamo.reset()
        w = torch.randn(1000, generator=torch.Generator().manual_seed(0)).cuda().requires_grad_()
        opt = ours_cls([w], lr=torch.tensor(0.01, device="cuda"), **extra)
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)

        def step():
            opt.step()
            sched.step()

        fn = torch.compile(step, backend="aot_eager") if compiled else step
        for i in range(5):
            w.grad = torch.randn(1000, generator=torch.Generator().manual_seed(i + 1)).cuda()
            fn()
        return w.detach()

    torch.testing.assert_close(run(True), run(False))


def test_mixed_devices_in_one_group():
    """A group with CPU and CUDA params: each device's params go to that device's kernel
    (bucketed by device), and each ends where a one-device run ends."""
    torch.manual_seed(0)
    cpu_p = torch.randn(100, requires_grad=True)
    cuda_p = torch.randn(100, device="cuda", requires_grad=True)
    alone = [cpu_p.detach().clone().requires_grad_(), cuda_p.detach().cpu().requires_grad_()]
    opt = fused_optim.AdamW([cpu_p, cuda_p], lr=0.01)
    ref = fused_optim.AdamW(alone, lr=0.01)
    for step in range(3):
        g = torch.randn(100), torch.randn(100)
        cpu_p.grad, cuda_p.grad = g[0].clone(), g[1].cuda()
        alone[0].grad, alone[1].grad = g[0].clone(), g[1].clone()
        opt.step()
        ref.step()
    assert torch.equal(cpu_p.detach(), alone[0].detach())
    assert torch.equal(cuda_p.detach().cpu(), alone[1].detach())


@pytest.mark.parametrize("handoff", [False, True])
@pytest.mark.parametrize("algo", ["SGD", "Adam", "AdamW"])
def test_grad_scaler_on_cuda(algo, handoff):
    """With the handoff, GradScaler hands the kernels grad_scale and found_inf: they unscale
    in the kernel and skip a step with inf grads (steps not counted), as torch's for-loop
    with the scaler's own unscale_ does (the default, without the handoff); compared with
    the CPU kernels bit for bit."""
    _, ours_cls = pu.ALGOS[algo]
    results = {}
    for device in ("cpu", "cuda"):
        # loss = (w * x).sum(): the scaled grad is x times a power of two, exact on any
        # device, so both devices' kernels see the same grads.
        w = torch.randn(100, generator=torch.Generator().manual_seed(0)).to(device)
        w.requires_grad_()
        opt = ours_cls([w], lr=0.01)
        opt._step_supports_amp_scaling = handoff  # (Note [GradScaler's handoff])
        scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
        for step in range(4):
            opt.zero_grad()
            x = torch.randn(100, generator=torch.Generator().manual_seed(step)).to(device)
            if step == 2:
                x[0] = float("inf")  # an inf grad: the step is skipped
            scaler.scale((w * x).sum()).backward()
            scaler.step(opt)
            scaler.update()
        results[device] = (w, opt)
    (cpu_w, cpu_opt), (cuda_w, cuda_opt) = results["cpu"], results["cuda"]
    assert torch.equal(cpu_w.detach(), cuda_w.detach().cpu())
    for key, value in cpu_opt.state[cpu_w].items():
        assert torch.equal(value, cuda_opt.state[cuda_w][key].cpu()), key
    if algo != "SGD":
        assert cuda_opt.state[cuda_w]["step"].item() == 3  # the skipped step is not counted


@pytest.mark.parametrize("algo", ["SGD", "Adam", "AdamW", "NAdam", "ASGD"])
def test_state_dict_interchange_on_cuda(algo):
    """A checkpoint moves between torch.optim and fused_optim on CUDA in both directions,
    with torch's state keys, dtypes and devices (the load puts NAdam's mu_product and ASGD's
    eta and mu on the GPU, where the kernels read them: host_mirror.cuh)."""
    torch_cls, ours_cls = pu.ALGOS[algo]
    options = dict(lr=0.01, momentum=0.9) if algo == "SGD" else dict(lr=0.01)
    for first, second in ((torch_cls, ours_cls), (ours_cls, torch_cls)):
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 4).cuda()
        opt = first(model.parameters(), **options)
        model(torch.randn(3, 8, device="cuda")).sum().backward()
        opt.step()
        clone = copy.deepcopy(model)
        other = second(clone.parameters(), **options)
        other.load_state_dict(copy.deepcopy(opt.state_dict()))  # state_dict() shares tensors
        x = torch.randn(3, 8, device="cuda")
        for m, o in ((model, opt), (clone, other)):
            o.zero_grad()
            m(x).sum().backward()
            o.step()
        for a, b in zip(model.parameters(), clone.parameters()):
            torch.testing.assert_close(a, b)  # torch's CUDA for-loop vs ours: a few ulps
        for (pa, sa), (pb, sb) in zip(opt.state.items(), other.state.items()):
            assert sa.keys() == sb.keys()
            for key in sa:
                assert sa[key].device == sb[key].device and sa[key].dtype == sb[key].dtype, key


def test_errors_before_any_update():
    """State on another device (a checkpoint loaded wrongly by hand) is refused with a
    clear error, and nothing was updated: params, state and steps unchanged."""
    p = torch.randn(10, device="cuda", requires_grad=True)
    q = torch.randn(10, device="cuda", requires_grad=True)
    opt = fused_optim.Adam([p, q], lr=0.1)
    p.grad, q.grad = torch.randn(10, device="cuda"), torch.randn(10, device="cuda")
    opt.step()
    opt.state[q]["exp_avg"] = opt.state[q]["exp_avg"].cpu()
    before = copy.deepcopy((p.detach(), q.detach(), opt.state[p], opt.state[q]))
    with pytest.raises(RuntimeError, match=r"exp_avgs\[1\] is on cpu but its param is on cuda"):
        opt.step()
    assert torch.equal(p.detach(), before[0]) and torch.equal(q.detach(), before[1])
    for state, old in ((opt.state[p], before[2]), (opt.state[q], before[3])):
        for key, value in old.items():
            assert torch.equal(state[key].cpu(), value.cpu()), key


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_params_on_two_gpus():
    """Params on two GPUs in one group: one kernel call per device, each on its device."""
    ps = [torch.randn(50, device=f"cuda:{i}", requires_grad=True) for i in (0, 1)]
    ref = [p.detach().cpu().requires_grad_() for p in ps]
    opt, ref_opt = fused_optim.Adam(ps, lr=0.1), fused_optim.Adam(ref, lr=0.1)
    # (Note [GradScaler's handoff])
    opt._step_supports_amp_scaling = ref_opt._step_supports_amp_scaling = True
    scaler, ref_scaler = torch.amp.GradScaler("cuda"), torch.amp.GradScaler("cpu")
    for step in range(3):
        xs = [torch.randn(50) for _ in ps]
        # GradScaler keeps grad_scale and found_inf on cuda:0; cuda:1's call gets copies
        loss = sum((p * x.to(p.device)).sum().to("cuda:0") for p, x in zip(ps, xs))
        scaler.scale(loss).backward()
        ref_scaler.scale(sum((r * x).sum() for r, x in zip(ref, xs))).backward()
        for o, s in ((opt, scaler), (ref_opt, ref_scaler)):
            s.step(o)
            s.update()
            o.zero_grad()
    for p, r in zip(ps, ref):
        assert torch.equal(p.detach().cpu(), r.detach())


# -- the param storage modes and state_dtype on CUDA (Note [storage on CUDA]) ------------
# The CPU kernels are compared with their references in test_param_storage.py and
# test_state_dtype.py; here the CUDA kernels give the CPU kernels' bits, element for
# element, params, every state, the mode's buffers, the 8-bit codes and their scales.
# (test_param_storage.py's and test_state_dtype.py's cases)
STORAGE_CASES = list(test_param_storage.CASES)
STORAGE_IDS = [c[0] for c in STORAGE_CASES]
MODES = test_param_storage.MODES
# Several 256-element blocks and a tail, a 2-D param, a scalar; for 8-bit state, params of
# 4,096 elements and more (quantized) with a short last block, one of three launch chunks
# (16,384 elements each), and a small one (kept in float32).
MODE_SHAPES = [(1000,), (37, 29), ()]
Q8_SHAPES = [(5000,), (40000,), (70, 80), (100,)]


def storage_run(name, kwargs, dtype, device, shapes, steps=5, grad_hook=None, **options):
    """`steps` steps of fused_optim.<name> on `device` from the same params and grads (made
    on the CPU); the generator reseeded first, so stochastic rounding draws the same seeds."""
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g).to(dtype).to(device).requires_grad_() for s in shapes]
    torch.manual_seed(1)
    opt = getattr(fused_optim, name)(params, **kwargs, **options)
    for step in range(steps):
        gg = torch.Generator().manual_seed(100 + step)
        for p, s in zip(params, shapes):
            grad = torch.randn(s, generator=gg)
            if grad_hook is not None:
                grad = grad_hook(step, grad)
            p.grad = grad.to(dtype).to(device)
        opt.step()
    return params, opt


def assert_same_run(cuda_run, cpu_run, what):
    (params, opt), (ref_params, ref_opt) = cuda_run, cpu_run
    for i, (p, r) in enumerate(zip(params, ref_params)):
        torch.testing.assert_close(p.detach().cpu(), r.detach(), rtol=0, atol=0, equal_nan=True,
                                   msg=f"{what}: param {i}")
        ours, theirs = opt.state[p], ref_opt.state[r]
        assert ours.keys() == theirs.keys(), f"{what}: state keys of param {i}"
        for key, value in theirs.items():
            mine = ours[key]
            if not torch.is_tensor(value):
                assert mine == value, f"{what}: state {key} of param {i}"
                continue
            # The host's scalars stay CPU tensors on every device: rounding_state (counted
            # on the host), and the steps and NAdam's mu_product (not capturable); the rest
            # lives on the param's device, ASGD's steps too (torch keeps them there: Note
            # [ASGD's scalar states on CUDA]).
            host = key in ("rounding_state", "mu_product") or (
                key == "step" and type(opt).__name__ != "ASGD")
            assert mine.device.type == ("cpu" if host else "cuda"), f"{what}: device of {key}"
            assert mine.dtype == value.dtype, f"{what}: dtype of state {key} of param {i}"
            torch.testing.assert_close(mine.cpu(), value, rtol=0, atol=0, equal_nan=True,
                                       msg=f"{what}: state {key} of param {i}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name,kwargs", STORAGE_CASES, ids=STORAGE_IDS)
def test_storage_modes_bitwise_equal_to_cpu(name, kwargs, mode, dtype):
    """Kahan summation, stochastic rounding and master weights on CUDA, five steps: the CPU
    kernels' bits (stochastic rounding: the same random bits, Note [stochastic rounding])."""
    cuda_run = storage_run(name, kwargs, dtype, "cuda", MODE_SHAPES, **{mode: True})
    cpu_run = storage_run(name, kwargs, dtype, "cpu", MODE_SHAPES, **{mode: True})
    assert_same_run(cuda_run, cpu_run, f"{name} {mode} {dtype}")


@pytest.mark.parametrize("pdtype,state_dtype", [
    (torch.float32, torch.uint8), (torch.bfloat16, torch.uint8), (torch.float16, torch.uint8),
    (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
    (torch.bfloat16, torch.float32)], ids=str)
@pytest.mark.parametrize("name,kwargs", test_state_dtype.CASES, ids=test_state_dtype.IDS)
def test_state_dtype_bitwise_equal_to_cpu(name, kwargs, pdtype, state_dtype):
    """state_dtype on CUDA, five steps, every algorithm with moments: the CPU kernels' bits;
    8-bit moments the same codes and block scales (Note [8-bit state on CUDA])."""
    cuda_run = storage_run(name, kwargs, pdtype, "cuda", Q8_SHAPES, state_dtype=state_dtype)
    cpu_run = storage_run(name, kwargs, pdtype, "cpu", Q8_SHAPES, state_dtype=state_dtype)
    assert_same_run(cuda_run, cpu_run, f"{name} {pdtype} state {state_dtype}")


def test_8bit_blocks_with_inf_and_nan_equal_to_cpu():
    """A block whose values reach inf or NaN (a grad of inf at step 2, one of NaN at step 3,
    in different blocks of the first param): the CUDA codes and scales are the CPU's, NaN
    scales included."""
    def hook(step, grad):
        if grad.shape == Q8_SHAPES[0] and step == 2:
            grad[300] = float("inf")
        if grad.shape == Q8_SHAPES[0] and step == 3:
            grad[4100] = float("nan")
        return grad
    cuda_run = storage_run("Adam", dict(lr=0.01), torch.float32, "cuda", Q8_SHAPES,
                           grad_hook=hook, state_dtype=torch.uint8)
    cpu_run = storage_run("Adam", dict(lr=0.01), torch.float32, "cpu", Q8_SHAPES,
                          grad_hook=hook, state_dtype=torch.uint8)
    assert torch.isnan(cpu_run[1].state[cpu_run[0][0]]["exp_avg_absmax"]).any()
    assert_same_run(cuda_run, cpu_run, "Adam 8-bit with inf and NaN")


@pytest.mark.parametrize("mode", MODES)
def test_storage_with_8bit_state_and_grad_scaler_equal_to_cpu(mode):
    """A mode and 8-bit moments at once, under a GradScaler (the grads unscaled in the
    kernel, a step with an inf grad skipped, which stochastic rounding does not count): the
    CPU's bits. The loss is sum(p * w) with w made on the CPU, so both devices' grads are w
    times the scale, exactly (a matmul would round differently on the GPU). float16 params:
    torch's CUDA GradScaler cannot unscale bfloat16 grads (its
    _amp_foreach_non_finite_check_and_unscale_ has no bfloat16 kernel in torch 2.11)."""
    shapes = [(5000,), (64,)]  # 8-bit moments, and float32 ones (under 4,096 elements)

    def train(device):
        g = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=g).to(torch.float16).to(device).requires_grad_()
                  for s in shapes]
        torch.manual_seed(1)
        opt = fused_optim.AdamW(params, lr=0.01, state_dtype=torch.uint8, **{mode: True})
        opt._step_supports_amp_scaling = True  # (Note [GradScaler's handoff])
        scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 10)
        for step in range(4):
            gg = torch.Generator().manual_seed(10 + step)
            ws = [torch.randn(s, generator=gg).to(torch.float16).float() for s in shapes]
            if step == 2:
                ws[0][7] = float("inf")
            loss = sum((p.float() * w.to(device)).sum() for p, w in zip(params, ws))
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        return params, opt
    cuda_run, cpu_run = train("cuda"), train("cpu")
    assert cpu_run[1].state[cpu_run[0][0]]["step"].item() == 3  # (the inf step skipped)
    assert_same_run(cuda_run, cpu_run, f"AdamW 8-bit {mode} scaler")


def test_storage_modes_refused_where_torch_steps():
    """A capturable ASGD group on CUDA runs torch's own step (Note [ASGD's scalar states on
    CUDA]: the kernels would synchronise): with a mode it refuses to step, before anything
    changes, rather than drop the mode."""
    p = torch.randn(10, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    opt = fused_optim.ASGD([p], lr=0.01, kahan_summation=True, capturable=True)
    p.grad = torch.randn_like(p)
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match="cannot keep params with kahan_summation=True"):
        opt.step()
    assert torch.equal(p.detach(), before)


def test_stochastic_rounding_refuses_graph_capture_and_8bit_replays():
    """A captured step would replay one step's random bits: stochastic rounding refuses
    capture with a clear error. 8-bit state (capturable Adam, after a warm-up step made the
    device maps) captures and replays as eager steps run."""
    def assert_capture_refused(cls, scaler_on_gpu, **kwargs):
        # One eager step, then a captured one, refused. With a GradScaler's found_inf on
        # the GPU, the same error, before found_inf (or a CUDA lr) is read on the host (a
        # read during the capture failed with CUDA's own error and broke the capture: a
        # review, 2026-12-06).
        p = torch.randn(5000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        opt = cls([p], stochastic_rounding=True, **kwargs)
        p.grad = torch.randn_like(p)
        opt.step()
        if scaler_on_gpu:
            opt.grad_scale = torch.ones((), device="cuda")
            opt.found_inf = torch.zeros((), device="cuda")
        with pytest.raises(RuntimeError, match="stochastic_rounding cannot be captured"):
            with torch.cuda.graph(torch.cuda.CUDAGraph()):
                opt.step()

    for scaler_on_gpu in (False, True):
        assert_capture_refused(fused_optim.Adam, scaler_on_gpu,
                               lr=torch.tensor(0.01, device="cuda"), capturable=True)
    # Where the steps live on the CPU (Adagrad has no capture check of its own).
    assert_capture_refused(fused_optim.Adagrad, True, lr=0.01)

    torch.manual_seed(0)
    params = [torch.randn(5000, device="cuda", requires_grad=True)]
    eager = [params[0].detach().clone().requires_grad_()]
    opt = fused_optim.Adam(params, lr=torch.tensor(0.01, device="cuda"), capturable=True,
                           state_dtype=torch.uint8)
    ref = fused_optim.Adam(eager, lr=torch.tensor(0.01, device="cuda"), capturable=True,
                           state_dtype=torch.uint8)
    grads = [torch.randn(5000, device="cuda") for _ in range(4)]
    params[0].grad, eager[0].grad = grads[0].clone(), grads[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    ref.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for g in grads[1:]:
        params[0].grad.copy_(g)
        eager[0].grad = g.clone()
        graph.replay()
        ref.step()
    torch.cuda.synchronize()
    assert torch.equal(params[0].detach(), eager[0].detach())
    for key in ("exp_avg", "exp_avg_absmax", "exp_avg_sq", "exp_avg_sq_absmax", "step"):
        assert torch.equal(opt.state[params[0]][key], ref.state[eager[0]][key]), key


# -- Adafactor (Note [Adafactor on CUDA] in csrc/cuda/adafactor.cu) ----------------------
def assert_adafactor_equal(cuda_run, cpu_run, msg=""):
    """Every param and state tensor of a CUDA run bitwise the CPU run's; the steps stay on
    the CPU (as torch.optim.Adafactor keeps them), the rest on the param's device."""
    (pc, oc), (pr, orf) = cuda_run, cpu_run
    for name, ref in pr.items():
        ours = pc[name]
        assert torch.equal(ours.detach().cpu(), ref.detach()), f"{msg} param {name}"
        sc, sr = oc.state.get(ours, {}), orf.state.get(ref, {})
        assert sc.keys() == sr.keys(), f"{msg} state keys of {name}"
        for key, v in sr.items():
            w = sc[key]
            if key == "step":
                assert w.device.type == "cpu" and torch.equal(w, v), f"{msg} {name}.step"
            else:
                assert w.device == ours.device and w.dtype == v.dtype, f"{msg} {name}.{key}"
                assert torch.equal(w.cpu(), v), f"{msg} {name}.{key}"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("options", ta.OPTIONS, ids=ta.IDS)
def test_adafactor_bitwise_equal_to_cpu(options, dtype):
    """Every option and layout of the CPU suite (tests/test_adafactor.py: vectors around the
    lanes and chunks, matrices, one row, one column, wide rows, many rows, batches,
    transposed, channels_last and sliced views, a param without a grad), two groups, 10
    steps: the CUDA kernels give the CPU kernel's bits (the same tasks, every sum in the
    same order, the same roundings)."""
    cuda = ta.run(fused_optim.Adafactor, options, dtype, device="cuda")
    cpu = ta.run(fused_optim.Adafactor, options, dtype)
    assert_adafactor_equal(cuda, cpu, f"{dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("options", ta.OPTIONS[::3], ids=ta.IDS[::3])
def test_adafactor_matches_torch_on_cuda(options, dtype):
    """Against torch's for-loop on CUDA, within the CPU suite's tolerances (its reductions
    add in other orders: Note [Adafactor's sums])."""
    ours = ta.run(fused_optim.Adafactor, options, dtype, device="cuda")
    ref = ta.run(torch.optim.Adafactor, options, dtype, device="cuda", foreach=False)
    ta.assert_close_trajectory(ours, ref, ta.TOL[dtype], f"{dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_adafactor_big_and_many_slices_equal_to_cpu(dtype):
    """Slices of more than 2^18 elements (several row blocks in pass 1, their column sums
    added in block order), a batch of many slices, a long vector; 3 steps, bitwise."""
    shapes = [(2100, 2050), (64, 9, 7), (4100, 1100), (3 * 2**16 + 11,)]

    def train(device):
        g = torch.Generator().manual_seed(0)
        ps = [torch.randn(s, generator=g).to(dtype).to(device).requires_grad_() for s in shapes]
        opt = fused_optim.Adafactor(ps, lr=0.5, weight_decay=0.1)
        for step in range(3):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g).to(dtype).to(device)
            opt.step()
        return {str(i): p for i, p in enumerate(ps)}, opt
    assert_adafactor_equal(train("cuda"), train("cpu"), f"{dtype}")


def test_adafactor_grad_scaler_on_cuda_equal_to_cpu():
    """Under GradScaler("cuda"): the grads unscaled in the kernels (and stored so), a step
    with an inf grad skipped; bitwise the CPU run under GradScaler("cpu")."""
    options = ta.OPTIONS[1]

    def train(device):
        params = ta.make_model(torch.float32, device=device)
        opt = ta.build(fused_optim.Adafactor, params, options)
        opt._step_supports_amp_scaling = True  # (Note [GradScaler's handoff])
        scaler = torch.amp.GradScaler(device, init_scale=2.0**10, growth_interval=1)
        scaler.scale(torch.ones((), device=device))  # (its scale is made by the first call)
        for step in range(6):
            ta.set_grads(params, torch.float32, step)
            for p in params.values():
                if p.grad is not None:
                    p.grad.mul_(scaler.get_scale())
            if step == 3:
                params["matrix"].grad[2, 5] = float("inf")
            scaler.step(opt)
            scaler.update()
        assert opt._step_supports_amp_scaling
        return params, opt
    cuda, cpu = train("cuda"), train("cpu")
    assert cpu[1].state[cpu[0]["matrix"]]["step"].item() == 5  # (the inf step skipped)
    assert_adafactor_equal(cuda, cpu, "GradScaler")
    for name, p in cpu[0].items():  # the unscaled grads, stored as GradScaler.unscale_ does
        if p.grad is not None:
            assert torch.equal(cuda[0][name].grad.cpu(), p.grad), name


def test_adafactor_mixed_devices_in_one_group():
    """Groups holding CPU and CUDA params: one kernel call per device, no fallback to
    torch's step (no warning), bitwise the all-CPU run."""
    cpu_model = ta.make_model(torch.float32)
    cuda_model = ta.make_model(torch.float32, device="cuda")
    mixed = {n: (cuda_model[n] if i % 2 else cpu_model[n]) for i, n in enumerate(cpu_model)}
    opt = ta.build(fused_optim.Adafactor, mixed, ta.OPTIONS[2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(5):
            ta.set_grads(mixed, torch.float32, step)
            opt.step()
    ref = ta.run(fused_optim.Adafactor, ta.OPTIONS[2], torch.float32, steps=5)
    assert_adafactor_equal((mixed, opt), ref, "mixed")


# -- SparseAdam and Muon on CUDA (first run on an H200 on 2026-12-04: docs/cuda.md) ------
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("options", tsa.OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_sparse_adam_bitwise_torch_on_cuda(options, dtype):
    """The CPU suite's layouts and uncoalesced grads (tests/test_sparse_adam.py), 5 steps on
    CUDA: bitwise torch.optim.SparseAdam on CUDA. Both coalesce with torch's CUDA coalesce,
    and torch's CUDA square root and divisions are IEEE, as the kernel's (Note [CUDA bits])."""
    def run(cls):
        params = {n: p.detach().to("cuda").requires_grad_()  # (strides kept: dense layouts)
                  for n, p in tsa.make_params(dtype).items()}
        opt = tsa.build(cls, params, options)
        for step in range(5):
            for k, (name, p) in enumerate(params.items()):
                shape, sparse_dim, _ = tsa.LAYOUTS[name]
                p.grad = tsa.sparse_grad(shape, sparse_dim, dtype, step, k,
                                         empty=(step == 2 and k == 1)).to("cuda")
            opt.step()
        return params, opt
    tsa.assert_same(run(fused_optim.SparseAdam), run(torch.optim.SparseAdam))


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch 2.9 or later")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("options", tm.OPTIONS, ids=str)
def test_muon_matches_torch_on_cuda(options, dtype):
    """Muon's CUDA step (ATen ops: batched Newton-Schulz products) against torch.optim.Muon
    on CUDA, 3 steps, with the CPU suite's tolerance (Note [Muon's tolerance] in
    tests/test_muon.py: the products' order differs; momentum buffers exact)."""
    kwargs = tm._opts(options)
    ref = [p.detach().to("cuda").requires_grad_() for p in tm.make_params(dtype)]
    ours = [p.detach().to("cuda").requires_grad_() for p in tm.make_params(dtype)]
    opt_ref = torch.optim.Muon(ref, **kwargs)
    opt_ours = fused_optim.Muon(ours, **kwargs)
    for step in range(3):
        gen = torch.Generator().manual_seed(1000 + step)
        for p, q in zip(ref, ours):
            g = torch.randn(p.shape, generator=gen).to(dtype).to("cuda")
            p.grad, q.grad = g.clone(), g.clone()
        opt_ref.step()
        opt_ours.step()
        tm.assert_matches(ours, ref, opt_ours, opt_ref, kwargs, step + 1)


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch 2.9 or later")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_muon_one_by_one_params_match_torch_on_cuda(dtype):
    """A 1x1 param's norm is its |x| (CUDA's _foreach_norm squares it and takes the root,
    which need not give |x| back: mended in 0033af7, never run on a GPU until this test)."""
    shapes = [(1, 1), (1, 1), (3, 1), (24, 24)]
    kwargs = tm._opts({})
    ref = [p.detach().to("cuda").requires_grad_() for p in tm.make_params(dtype, shapes=shapes)]
    ours = [p.detach().to("cuda").requires_grad_() for p in tm.make_params(dtype, shapes=shapes)]
    opt_ref = torch.optim.Muon(ref, **kwargs)
    opt_ours = fused_optim.Muon(ours, **kwargs)
    for step in range(3):
        gen = torch.Generator().manual_seed(2000 + step)
        for p, q in zip(ref, ours):
            g = (torch.randn(p.shape, generator=gen) * 1e3).to(dtype).to("cuda")
            p.grad, q.grad = g.clone(), g.clone()
        opt_ref.step()
        opt_ours.step()
        tm.assert_matches(ours, ref, opt_ours, opt_ref, kwargs, step + 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_asgd_scalar_states_stay_on_the_gpu(dtype):
    """Note [ASGD's scalar states on CUDA]: step, eta and mu stay float32 tensors on the
    param's GPU (as torch keeps them), with the CPU run's values, step after step."""
    def train(device):
        g = torch.Generator().manual_seed(0)
        ps = [torch.randn(s, generator=g).to(dtype).to(device).requires_grad_()
              for s in [(300,), (7, 9)]]
        opt = fused_optim.ASGD(ps, lr=0.05, lambd=0.1, alpha=0.6, t0=2.0, weight_decay=0.1)
        for step in range(5):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g).to(dtype).to(device)
            opt.step()
        return ps, opt
    (pc, oc), (pr, orf) = train("cuda"), train("cpu")
    for p, q in zip(pc, pr):
        assert torch.equal(p.detach().cpu(), q.detach())
        for key in ("step", "eta", "mu"):
            v = oc.state[p][key]
            assert v.device == p.device and v.dtype == torch.float32 and v.dim() == 0, key
            assert torch.equal(v.cpu(), orf.state[q][key]), key
        assert torch.equal(oc.state[p]["ax"].cpu(), orf.state[q]["ax"])


def test_asgd_scalar_states_of_mixed_dtypes_and_shapes():
    """The same, where a list of the scalar states mixes dtypes (one param's eta float64, as a
    hand-made state may have it) and shapes (one mu of shape (1,)): every state keeps its
    dtype and shape, with the CPU run's values (Note [ASGD's scalar states on CUDA]: a list
    of one dtype is gathered and written back in one kernel each, a mixed one per tensor)."""
    def train(device):
        g = torch.Generator().manual_seed(1)
        ps = [torch.randn(s, generator=g).to(device).requires_grad_() for s in [(30,), (4, 5), (6,)]]
        opt = fused_optim.ASGD(ps, lr=0.05, lambd=0.1, alpha=0.6, t0=1.0)
        for step in range(6):
            if step == 2:
                opt.state[ps[1]]["eta"] = opt.state[ps[1]]["eta"].double()
                opt.state[ps[0]]["mu"] = opt.state[ps[0]]["mu"].reshape(1)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g).to(device)
            opt.step()
        return ps, opt
    (pc, oc), (pr, orf) = train("cuda"), train("cpu")
    for p, q in zip(pc, pr):
        assert torch.equal(p.detach().cpu(), q.detach())
        for key in ("step", "eta", "mu", "ax"):
            v, w = oc.state[p][key], orf.state[q][key]
            assert v.device == p.device and v.dtype == w.dtype and v.shape == w.shape, key
            assert torch.equal(v.cpu(), w), key
    assert oc.state[pc[1]]["eta"].dtype == torch.float64 and oc.state[pc[0]]["mu"].shape == (1,)


@pytest.mark.parametrize("name,kwargs,keys", [
    ("ASGD", dict(lr=0.05, lambd=0.1, t0=2.0), ("step", "eta", "mu", "ax")),
    ("NAdam", dict(lr=0.05, momentum_decay=0.01), ("step", "mu_product", "exp_avg", "exp_avg_sq"))])
def test_asgd_capturable_runs_torchs_step(name, kwargs, keys):
    """A capturable ASGD or NAdam group on CUDA runs torch's own (capturable) step, with the
    one-time warning (their scalar states are updated on the host: Note [scalar states] in
    csrc/plan.h): torch's bits."""
    def train(cls):
        g = torch.Generator().manual_seed(0)
        p = torch.randn(50, generator=g).to("cuda").requires_grad_()
        opt = cls([p], capturable=True, **kwargs)
        for _ in range(4):
            p.grad = torch.randn(50, generator=g).to("cuda")
            opt.step()
        return p, opt
    # (the warning is once per process and class and reason: forgotten first, so that it
    # comes here whatever ran before in this process)
    fused_optim.optimizer.FusedOptimizer._warned.discard((name, "capturable=True"))
    with pytest.warns(UserWarning, match="the fused kernels do not support capturable=True"):
        ours = train(getattr(fused_optim, name))
    ref = train(getattr(torch.optim, name))
    assert torch.equal(ours[0], ref[0])
    for key in keys:
        assert torch.equal(ours[1].state[ours[0]][key], ref[1].state[ref[0]][key]), key


def test_asgd_checkpoint_loaded_on_the_cpu_resumes_on_the_gpu():
    """A checkpoint saved on the GPU and loaded with map_location="cpu" (torch's
    load_state_dict then leaves `step` on the CPU and moves eta and mu to the GPU) resumes
    bit for bit as the uninterrupted run (Note [ASGD's scalar states on CUDA]: each list
    is read where it lives)."""
    import io

    def fresh():
        g = torch.Generator().manual_seed(0)
        p = torch.randn(40, generator=g).to("cuda").requires_grad_()
        return p, fused_optim.ASGD([p], lr=0.05, lambd=0.1, t0=2.0)

    def grad(step):
        return torch.randn(40, generator=torch.Generator().manual_seed(100 + step)).to("cuda")

    p, opt = fresh()
    q, other = fresh()
    for step in range(5):
        if step == 2:
            buf = io.BytesIO()
            torch.save(other.state_dict(), buf)
            buf.seek(0)
            q2, other = fresh()
            with torch.no_grad():
                q2.copy_(q)
            q = q2
            other.load_state_dict(torch.load(buf, map_location="cpu"))
            s = other.state[q]
            assert s["step"].device.type == "cpu" and s["eta"].device == q.device
        p.grad, q.grad = grad(step), grad(step)
        opt.step()
        other.step()
    assert torch.equal(p, q)
    for key in ("eta", "mu", "ax"):
        assert torch.equal(opt.state[p][key], other.state[q][key]), key
    assert opt.state[p]["step"].item() == other.state[q]["step"].item() == 5
