"""The custom ops themselves: schemas, fake kernels (torch.library.opcheck)."""
import pytest
import torch

import fused_optim  # noqa: F401
from fused_optim import _ops


def tensors(dtype, n=(3, 17, 1)):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(k, generator=g).to(dtype) for k in n]


DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scaler", [False, True])
def test_opcheck_adam(dtype, scaler):
    ps, gs = tensors(dtype), tensors(dtype)
    ms, vs, mx = tensors(dtype), [t.abs() for t in tensors(dtype)], [t.abs() for t in tensors(dtype)]
    steps = [torch.tensor(1.0) for _ in ps]
    extra = (torch.tensor(0.01), torch.tensor(4.0), torch.tensor(0.0)) if scaler else (None, None, None)
    torch.library.opcheck(
        torch.ops.fused_optim.adam_.default,
        (ps, gs, ms, vs, mx, steps, 0.01, 0.9, 0.999, 0.1, 1e-8, True, False, True) + extra)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scaler", [False, True])
def test_opcheck_sgd(dtype, scaler):
    ps, gs, bufs = tensors(dtype), tensors(dtype), tensors(dtype)
    extra = (torch.tensor(0.1), torch.tensor(4.0), torch.tensor(0.0)) if scaler else (None, None, None)
    torch.library.opcheck(torch.ops.fused_optim.sgd_.default,
                          (ps, gs, bufs, 0.1, 0.9, 0.0, 0.01, True, False, False) + extra)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scaler", [False, True])
@pytest.mark.parametrize("centered,momentum", [(False, 0.0), (True, 0.9)])
def test_opcheck_rmsprop(dtype, scaler, centered, momentum):
    ps, gs, sq = tensors(dtype), tensors(dtype), [t.abs() for t in tensors(dtype)]
    gavg = tensors(dtype) if centered else []
    bufs = tensors(dtype) if momentum else []
    steps = [torch.tensor(1.0) for _ in ps]
    extra = (torch.tensor(0.01), torch.tensor(4.0), torch.tensor(0.0)) if scaler else (None, None, None)
    torch.library.opcheck(
        torch.ops.fused_optim.rmsprop_.default,
        (ps, gs, sq, gavg, bufs, steps, 0.01, 0.99, 1e-8, 0.1, momentum, centered, True) + extra)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scaler", [False, True])
def test_opcheck_adagrad(dtype, scaler):
    ps, gs, sums = tensors(dtype), tensors(dtype), [t.abs() for t in tensors(dtype)]
    steps = [torch.tensor(1.0) for _ in ps]
    extra = (torch.tensor(0.01), torch.tensor(4.0), torch.tensor(0.0)) if scaler else (None, None, None)
    torch.library.opcheck(torch.ops.fused_optim.adagrad_.default,
                          (ps, gs, sums, steps, 0.01, 0.01, 0.1, 1e-10, False) + extra)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scaler", [False, True])
def test_opcheck_adamax(dtype, scaler):
    ps, gs, ms, infs = tensors(dtype), tensors(dtype), tensors(dtype), [t.abs() for t in tensors(dtype)]
    steps = [torch.tensor(1.0) for _ in ps]
    extra = (torch.tensor(0.01), torch.tensor(4.0), torch.tensor(0.0)) if scaler else (None, None, None)
    torch.library.opcheck(torch.ops.fused_optim.adamax_.default,
                          (ps, gs, ms, infs, steps, 0.01, 0.9, 0.999, 0.1, 1e-8, True) + extra)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scaler", [False, True])
def test_opcheck_adadelta(dtype, scaler):
    ps, gs = tensors(dtype), tensors(dtype)
    sq, acc = [t.abs() for t in tensors(dtype)], [t.abs() for t in tensors(dtype)]
    steps = [torch.tensor(1.0) for _ in ps]
    extra = (torch.tensor(0.5), torch.tensor(4.0), torch.tensor(0.0)) if scaler else (None, None, None)
    torch.library.opcheck(torch.ops.fused_optim.adadelta_.default,
                          (ps, gs, sq, acc, steps, 0.5, 0.9, 1e-6, 0.1, True) + extra)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scaler", [False, True])
def test_opcheck_nadam(dtype, scaler):
    ps, gs, ms, vs = tensors(dtype), tensors(dtype), tensors(dtype), [t.abs() for t in tensors(dtype)]
    mu_products = [torch.tensor(0.9) for _ in ps]
    steps = [torch.tensor(1.0) for _ in ps]
    extra = (torch.tensor(0.01), torch.tensor(4.0), torch.tensor(0.0)) if scaler else (None, None, None)
    torch.library.opcheck(
        torch.ops.fused_optim.nadam_.default,
        (ps, gs, ms, vs, mu_products, steps, 0.01, 0.9, 0.999, 0.1, 1e-8, 4e-3, True, False) + extra)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scaler", [False, True])
@pytest.mark.parametrize("step", [1.0, 9.0])  # unrectified, rectified
def test_opcheck_radam(dtype, scaler, step):
    ps, gs, ms, vs = tensors(dtype), tensors(dtype), tensors(dtype), [t.abs() for t in tensors(dtype)]
    steps = [torch.tensor(step) for _ in ps]
    extra = (torch.tensor(0.01), torch.tensor(4.0), torch.tensor(0.0)) if scaler else (None, None, None)
    torch.library.opcheck(torch.ops.fused_optim.radam_.default,
                          (ps, gs, ms, vs, steps, 0.01, 0.9, 0.999, 0.1, 1e-8, True, False) + extra)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scaler", [False, True])
def test_opcheck_rprop(dtype, scaler):
    ps, gs, prevs = tensors(dtype), tensors(dtype), tensors(dtype)
    sizes = [torch.full_like(t, 0.01) for t in ps]
    steps = [torch.tensor(1.0) for _ in ps]
    extra = (torch.tensor(4.0), torch.tensor(0.0)) if scaler else (None, None)
    torch.library.opcheck(torch.ops.fused_optim.rprop_.default,
                          (ps, gs, prevs, sizes, steps, 0.5, 1.2, 1e-6, 50.0, False) + extra)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scaler", [False, True])
def test_opcheck_asgd(dtype, scaler):
    ps, gs, axs = tensors(dtype), tensors(dtype), tensors(dtype)
    mus, etas = [torch.tensor(0.5) for _ in ps], [torch.tensor(0.01) for _ in ps]
    steps = [torch.tensor(4.0) for _ in ps]
    extra = (torch.tensor(0.01), torch.tensor(4.0), torch.tensor(0.0)) if scaler else (None, None, None)
    torch.library.opcheck(torch.ops.fused_optim.asgd_.default,
                          (ps, gs, axs, mus, etas, steps, 0.01, 1e-4, 0.75, 3.0, 0.1, False) + extra)


def test_opcheck_stream():
    a = [torch.randn(100) for _ in range(4)]
    torch.library.opcheck(torch.ops.fused_optim._stream_.default, (a[:3], a[3:], 0.5))


def test_opcheck_side_by_side():
    """Note [small states side by side]: schema, fake kernel and dispatch agree; the
    copies equal their sources and the zeros are zeros, one dtype or several, each with its
    own storage."""
    ts = [torch.randn(3), torch.randn(40, 5), torch.randn(17).bfloat16(), torch.arange(9)]
    for copy in (True, False):
        torch.library.opcheck(torch.ops.fused_optim._side_by_side.default, (ts, copy))
    zeros = torch.ops.fused_optim._side_by_side(ts, False)
    copies = torch.ops.fused_optim._side_by_side(ts, True)
    for t, c, z in zip(ts, copies, zeros):
        for u in (c, z):
            assert (u.dtype, u.shape, u.stride()) == (t.dtype, t.shape, t.stride())
            assert u.untyped_storage().nbytes() == u.nbytes and u.data_ptr() % 64 == 0
        assert torch.equal(c, t) and c.data_ptr() != t.data_ptr()
        assert torch.equal(z, torch.zeros_like(t))
    with pytest.raises(RuntimeError, match=r"tensors\[1\] is not a contiguous strided CPU tensor"):
        torch.ops.fused_optim._side_by_side([torch.randn(3), torch.randn(4, 3).t()], True)
    # Each storage as a torch CPU tensor's: resizable, and copy-on-write clones work.
    lazy = torch._lazy_clone(copies[1])
    copies[1].add_(1)
    assert torch.equal(lazy, ts[1]) and torch.equal(copies[1], ts[1] + 1)
    copies[0].resize_(1000)
    assert torch.equal(copies[0][:3], ts[0])


def test_side_by_side_tensors_free_their_allocation_with_the_last():
    """Note [copies side by side]: the allocation lives while any copy does. Seen in the
    resident set: 256 MB of copies (an allocation the C library maps, and unmaps when it is
    freed). Skipped where another allocator is preloaded (jemalloc, tcmalloc and mimalloc
    keep freed memory in the process, by design)."""
    import os

    if any(name in os.environ.get("LD_PRELOAD", "") for name in ("jemalloc", "tcmalloc", "mimalloc")):
        pytest.skip("another allocator is preloaded: freed memory stays in the resident set")

    def resident_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    src = [torch.ones(2**25), torch.ones(2**25)]
    before = resident_mib()
    copies = torch.ops.fused_optim._side_by_side(src, True)
    assert resident_mib() - before > 200
    first = copies.pop(0)
    del copies
    assert resident_mib() - before > 200  # (the first copy holds the whole allocation)
    assert first.sum().item() == 2**25
    del first
    assert resident_mib() - before < 56


@pytest.mark.parametrize("mode", [1, 2, 3], ids=["kahan", "stochastic", "master"])
def test_opcheck_param_storage(mode):
    """The storage modes' arguments (Note [param storage]): schema, fake kernel and
    dispatch agree, the param_aux list mutated as annotated."""
    ps, gs = [torch.randn(40).bfloat16() for _ in range(2)], [torch.randn(40).bfloat16() for _ in range(2)]
    ms, vs = [torch.zeros(40).bfloat16() for _ in range(2)], [torch.zeros(40).bfloat16() for _ in range(2)]
    steps = [torch.tensor(0.0) for _ in range(2)]
    aux = {1: [torch.zeros(40).bfloat16() for _ in range(2)],
           2: [torch.tensor([7, 0]) for _ in range(2)],
           3: [p.float() for p in ps]}[mode]
    torch.library.opcheck(torch.ops.fused_optim.adam_.default,
                          (ps, gs, ms, vs, [], steps, 0.01, 0.9, 0.999, 0.0, 1e-8, False, False,
                           False, None, None, None, mode, aux))


@pytest.mark.parametrize("inout,reads", [(1, 1), (3, 1), (4, 1), (1, 2), (3, 2), (4, 2), (1, 4),
                                         (1, 5), (2, 4), (2, 5)])
def test_stream_computes_its_pattern(inout, reads):
    """The bandwidth probe of each optimizer's pattern (benchmarks/bench.py), with one read
    more where the step clips by the grads' norm: inout = inout * 0.5 + the sum of reads."""
    io_, rd = [torch.randn(1000) for _ in range(inout)], [torch.randn(1000) for _ in range(reads)]
    total = rd[0].clone()
    for r in rd[1:]:
        total += r
    expected = [t * 0.5 + total for t in io_]
    _ops.stream_(io_, rd, 0.5)
    for a, b in zip(io_, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=r"got \(3, 4\)"):
        _ops.stream_(io_[:1] * 3, rd[:1] * 4, 0.5)


def test_schemas_annotate_every_mutated_list():
    schema = torch.ops.fused_optim.adam_.default._schema
    mutated = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    # (param_aux: the param storage's buffers, Note [param storage] in csrc/plan.h)
    assert mutated == {"params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps",
                       "param_aux"}
    schema = torch.ops.fused_optim.sgd_.default._schema
    mutated = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert mutated == {"params", "grads", "momentum_buffers", "param_aux"}
    schema = torch.ops.fused_optim.rmsprop_.default._schema
    mutated = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert mutated == {"params", "grads", "square_avgs", "grad_avgs", "momentum_buffers",
                       "state_steps", "param_aux"}
    schema = torch.ops.fused_optim.adagrad_.default._schema
    mutated = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert mutated == {"params", "grads", "state_sums", "state_steps", "param_aux"}
    schema = torch.ops.fused_optim.adamax_.default._schema
    mutated = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert mutated == {"params", "grads", "exp_avgs", "exp_infs", "state_steps", "param_aux"}
    schema = torch.ops.fused_optim.adadelta_.default._schema
    mutated = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert mutated == {"params", "grads", "square_avgs", "acc_deltas", "state_steps", "param_aux"}
    schema = torch.ops.fused_optim.nadam_.default._schema
    mutated = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert mutated == {"params", "grads", "exp_avgs", "exp_avg_sqs", "mu_products", "state_steps",
                       "param_aux"}
    schema = torch.ops.fused_optim.radam_.default._schema
    mutated = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert mutated == {"params", "grads", "exp_avgs", "exp_avg_sqs", "state_steps", "param_aux"}
    schema = torch.ops.fused_optim.rprop_.default._schema
    mutated = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert mutated == {"params", "grads", "prevs", "step_sizes", "state_steps", "param_aux"}
    schema = torch.ops.fused_optim.asgd_.default._schema
    mutated = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert mutated == {"params", "grads", "axs", "mus", "etas", "state_steps", "param_aux"}
