"""Import-time checks of the compiled extension."""
import pytest
import torch

from fused_optim import _loader


def test_mismatched_torch_gives_a_rebuild_message(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.13.99-not-the-build-torch")
    with pytest.raises(ImportError) as e:
        _loader.load_extension()
    message = str(e.value)
    assert "was built against torch" in message and "2.13.99-not-the-build-torch" in message
    assert "pip install --no-build-isolation" in message


def test_build_info_matches_running_torch():
    info = _loader.load_extension()
    assert info.TORCH_VERSION == torch.__version__
    assert isinstance(info.WITH_CUDA, bool)


def test_parallel_regions_use_every_thread():
    # at::parallel_for is compiled into our library: built without OpenMP (under torch's
    # OpenMP backend) it would silently run every step on one thread.
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert torch.ops.fused_optim._parallel_workers(10_000) == threads
    finally:
        torch.set_num_threads(old)
