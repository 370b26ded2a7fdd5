"""The smoke suite: `python -m pytest tests -m smoke`, a few minutes' subset that CI runs on
the oldest supported torch, on the newest Python and on an installed wheel (docs/install.md):
every algorithm's parity on one option set, checkpoints both ways with torch.optim, the eager
fast path, torch.compile, and the build and version checks. The tests are the whole suite's
own; this only marks some of them."""

# Tests marked whole (every parametrization): cheap, and about the install itself or the
# installed torch (test_torch_optim_db.py runs torch's own optimizer test database).
_WHOLE_FILES = ("test_build.py", "test_install.py", "test_torch_optim_db.py")
# Tests of which every CPU parametrization at fp32 is marked (their dtype axis lists
# torch.float32 first: pytest names it dtype0).
_FP32_CASES = (
    "test_state_dict.py::test_checkpoint_interchange_continues_identically",
)
# Tests of which every CPU parametrization is marked.
_EVERY_CASE = (
    "test_state_dict.py::test_fresh_state_matches_torch_keys_dtypes_layouts",
    "test_fast_path.py::test_fast_path_is_bitwise_the_dispatcher_path",
    "test_integrations.py::test_compiled_training_step_has_no_graph_break_from_fused_optim",
    "test_api.py::test_namespace_offers_every_torch_optim_name",
    # torch's norm order, SparseAdam's op-by-op rounding and the backward hooks are about
    # the installed torch's own kernels and autograd: checked on every lane's torch.
    "test_clip.py::test_norm_bitwise_on_every_length_and_scale",
    "test_sparse_adam.py::test_embedding_training_matches_torch",
    "test_step_in_backward.py::test_grads_are_freed_and_params_updated_during_backward",
    "test_step_in_backward.py::test_checkpoint_to_torch_optim_continues_identically",
)
# Tests of which the first case of each algorithm is marked (one option set per algorithm).
_FIRST_PER_ALGO = (
    "test_parity.py::test_full_precision_bitwise_with_ieee_sqrt",
    "test_parity.py::test_low_precision_bitwise_with_rounded_reference",
)


def pytest_configure(config):
    config.addinivalue_line("markers", "smoke: the smoke suite (see tests/conftest.py)")


def _name(item):
    return item.nodeid.split("/")[-1].split("[")[0]


def pytest_collection_modifyitems(config, items):
    import pytest

    seen = set()
    for item in items:
        name, params = _name(item), item.nodeid.partition("[")[2]
        if "cuda" in params.split("-"):
            continue
        smoke = (
            name.split("::")[0] in _WHOLE_FILES
            or name in _EVERY_CASE
            or (name in _FP32_CASES and params.endswith("-dtype0]"))  # (float32 first)
        )
        if name in _FIRST_PER_ALGO:
            algo = params.split("[")[0]
            key = (name, algo)
            smoke = key not in seen and (params.endswith("-fp32]") or params.endswith("-bf16]"))
            if smoke:
                seen.add(key)
        if smoke:
            item.add_marker(pytest.mark.smoke)
