"""The parity suite: fused_optim against torch.optim, every option x dtype x layout.

Each case runs 10 steps with fresh non-zero random grads on a model holding every layout
(contiguous, transposed, channels_last, strided views, grads with other strides, 0-dim,
zero-size, complex, sizes around every vector width and block size), in two param groups,
with one param that never gets a grad, and compares every element of every param and
every state tensor.
"""
import inspect

import pytest
import torch

import parity_utils as pu

CASES = [(algo, o) for algo, opts in pu.OPTIONS.items() for o in opts]
IDS = [f"{algo}[{pu.option_id(o)}]" for algo, o in CASES]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("algo,options", CASES, ids=IDS)
def test_full_precision_matches_for_loop(algo, options, dtype):
    torch_cls, ours_cls = pu.ALGOS[algo]
    ours = pu.run(ours_cls, options, dtype)
    ref = pu.run(torch_cls, options, dtype, foreach=False)
    # torch.testing's default tolerances for the dtype (fp32: rtol 1.3e-6, atol 1e-5;
    # fp64: rtol 1e-7, atol 1e-7), as the issue asks. The only difference is torch's
    # sqrt (see the bitwise test below): a few ulps at most.
    pu.assert_same_trajectory(ours, ref, exact=False, msg=f"{algo} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("algo,options", CASES, ids=IDS)
def test_full_precision_bitwise_with_ieee_sqrt(algo, options, dtype):
    """Bit for bit equal to the for-loop once its sqrt is the IEEE one (see
    parity_utils.correctly_rounded_sqrt): every other op matches torch's rounding."""
    torch_cls, ours_cls = pu.ALGOS[algo]
    ours = pu.run(ours_cls, options, dtype)
    with pu.correctly_rounded_sqrt():
        ref = pu.run(torch_cls, options, dtype, foreach=False)
    pu.assert_same_trajectory(ours, ref, exact=True, msg=f"{algo} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("algo", ["Adam", "AdamW"])
def test_tensor_betas(algo, dtype):
    """betas given as tensors: torch's for-loop then computes 1 - beta and the bias
    corrections as float32 tensor ops, where we use their values in double as for float
    betas. That moves coefficients by an ulp of float32, far inside assert_close's default
    tolerances."""
    torch_cls, ours_cls = pu.ALGOS[algo]
    options = dict(lr=0.01, betas=(torch.tensor(0.8), torch.tensor(0.99)), amsgrad=True)
    ours = pu.run(ours_cls, options, dtype)
    ref = pu.run(torch_cls, options, dtype, foreach=False)
    pu.assert_same_trajectory(ours, ref, exact=False, msg=f"{algo} tensor betas")


def test_radam_cases_take_both_branches():
    """RAdam's update is rectified where rho_t > 5 (torch.optim.radam): over the 10 steps of
    each case, both ways are taken."""
    for o in pu.OPTIONS["RAdam"]:
        beta2 = o.get("betas", (0.9, 0.999))[1]
        rho_inf = 2 / (1 - beta2) - 1
        rho = [rho_inf - 2 * t * beta2**t / (1 - beta2**t) for t in range(1, 11)]
        assert min(rho) <= 5.0 < max(rho), o


LOW = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("algo,options", CASES, ids=IDS)
def test_low_precision_bitwise_with_rounded_reference(algo, options, dtype):
    """bf16/fp16 params: the math runs in float and only stored values (params and state)
    are rounded, as torch's fused=True kernels intend. The exact reference for that is
    torch's for-loop in float32 with params and state rounded to 16 bits after every step
    (and the IEEE sqrt): bit for bit, on every layout."""
    torch_cls, ours_cls = pu.ALGOS[algo]
    params, opt = pu.run(ours_cls, options, dtype)
    with pu.correctly_rounded_sqrt():
        ref_params, ref_state = pu.run_rounded_reference(torch_cls, options, dtype)
    state = pu.state_of(opt, params)
    for name, ref in ref_params.items():
        pu.check(params[name].detach(), ref.detach(), True, f"{algo} {dtype} param {name}")
        assert state[name].keys() == ref_state[name].keys(), f"state keys of {name}"
        for key, value in ref_state[name].items():
            assert state[name][key].dtype == value.dtype, f"dtype of state {name}.{key}"
            pu.check(state[name][key], value, True, f"{algo} {dtype} state {name}.{key}")


# torch 2.13's CPU fused=True SGD is wrong in bf16/fp16 for tensors of 16 elements or more
# (one lr=0.1 step lands up to 0.27 away from the float result), so only Adam/AdamW are
# compared with it; SGD is covered by the rounded reference above and the fp64 test below.
# torch has no fused=True for RMSprop, Adamax, Adadelta, NAdam, RAdam, Rprop and ASGD.
# torch's fused Adagrad rounds weight_decay, eps and the decayed lr to the 16-bit param type
# before using them (0.1 becomes 0.09998 in fp16), where we keep them in float as every other
# path does; with weight decay that moves an element by several 16-bit ulps (measured: 1 of
# 65539 elements, 6 ulps, in fp16), so those cases are checked by the rounded reference and
# the fp64 test only.
FUSED_CASES = [(a, o) for a, o in CASES if a != "SGD"
               and "fused" in inspect.signature(pu.ALGOS[a][0]).parameters
               and not (a == "Adagrad" and o["weight_decay"] != 0)]
FUSED_IDS = [f"{a}[{pu.option_id(o)}]" for a, o in FUSED_CASES]


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("algo,options", FUSED_CASES, ids=FUSED_IDS)
def test_low_precision_matches_torch_fused(algo, options, dtype):
    """Against torch's fused=True of the same dtype, on the layouts it handles correctly."""
    torch_cls, ours_cls = pu.ALGOS[algo]
    names = pu.fused_safe_layouts(dtype)
    ours = pu.run(ours_cls, options, dtype, names=names)
    ref = pu.run(torch_cls, options, dtype, names=names, fused=True)
    # Tolerance: the two kernels order a few float ops differently (torch fused computes
    # m*beta1 + g*(1-beta1) where we lerp, as torch's for-loop does), so a stored value
    # can round to the neighbouring 16-bit number; over 10 steps such flips feed back
    # through the state. 2 ulps of the 16-bit type relative (bf16 eps 2^-7, fp16 2^-10)
    # bounds what we measured, with atol for values near zero.
    eps = torch.finfo(dtype).eps
    pu.assert_same_trajectory(ours, ref, exact=False, msg=f"{algo} {dtype}",
                              rtol=2 * eps, atol=2 * eps)


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("algo,options", CASES, ids=IDS)
def test_low_precision_close_to_fp64(algo, options, dtype):
    """Against the same training in float64 (same initial values, same grads), on every
    layout."""
    torch_cls, ours_cls = pu.ALGOS[algo]
    ours_p, _ = pu.run(ours_cls, options, dtype)
    ref_p, _ = pu.run(torch_cls, options, dtype, ref_dtype=torch.float64, foreach=False)
    eps = torch.finfo(dtype).eps
    for name, ref in ref_p.items():
        ref = ref.detach()
        if ref.numel() == 0:
            continue
        err = (ours_p[name].detach().double() - ref).abs().max().item()
        # Each of the 10 steps rounds the param (half an ulp: <= eps/2 * max|p|) and the
        # state; a state rounding moves the update by at most lr * eps/2 * |state|, and with
        # these lrs (<= 0.1) and unit-normal grads lr * |state| stays below 1 (momentum
        # buffers sum at most 10 grads). So 10 steps x eps x (max|p| + 1) bounds the drift
        # of the 16-bit trajectory from the exact one, with a factor 2 to spare.
        bound = 10 * eps * (ref.abs().max().item() + 1.0)
        assert err <= bound, f"{algo} {dtype} {name}: max error {err} vs fp64 > {bound}"
