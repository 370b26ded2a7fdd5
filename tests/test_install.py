"""Installing never changes the user's torch: no declared torch dependency, the supported
releases checked at build time and at import, and a build under FUSED_OPTIM_CUDA=auto that
cannot have its CUDA kernels is a CPU build with a warning (docs/install.md)."""
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from fused_optim import _loader, _support

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_torch_is_not_a_declared_dependency():
    # pip would otherwise replace a user's torch to satisfy it (issue 15's first finding).
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        text = f.read()
    deps = re.search(r"^dependencies = \[(.*?)\]", text, flags=re.M | re.S).group(1)
    assert "torch" not in deps
    requires = re.search(r"^requires = \[(.*?)\]", text, flags=re.M | re.S).group(1)
    assert "torch" not in requires
    assert re.search(r'^requires-python = ">=3\.10"', text, flags=re.M)


@pytest.mark.parametrize("version,error,warning", [
    ("2.7.1+cu126", True, False),
    ("1.13.1", True, False),
    ("2.8.0", False, False),
    ("2.13.0+cpu", False, False),
    ("2.14.1+cu130", False, False),
    ("2.15.0", False, False),
    ("2.16.0", False, True),
    ("3.0.0a0+git1234", False, True),
])
def test_supported_torch_range(version, error, warning):
    e, w = _support.torch_problem(version)
    assert (e is not None, w is not None) == (error, warning)
    for message in filter(None, (e, w)):
        assert "torch 2.8 to 2.15" in message and version in message
    if e:
        assert "pip install --no-build-isolation -e ." in e


def test_supported_python_range():
    assert _support.python_problem((3, 9, 18))[0] is not None
    assert _support.python_problem((3, 10, 0)) == (None, None)
    assert _support.python_problem((3, 13, 0)) == (None, None)
    assert _support.python_problem((3, 14, 0))[1] is not None
    assert _support.python_problem(sys.version_info)[0] is None


def test_import_refuses_an_unsupported_torch(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.6.0")
    with pytest.raises(ImportError, match=r"supports torch 2\.8 to 2\.15; this environment has "
                                          r"torch 2\.6\.0"):
        _loader.load_extension()


def _fake_package(tmp_path, name, source):
    """A package `name` whose __init__.py is `source`, in a folder to put first on
    PYTHONPATH (returned), so that setup.py imports it instead of the installed one."""
    pkg = tmp_path / "fake" / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(source)
    return str(tmp_path / "fake")


def _fake_torch(tmp_path, version):
    return _fake_package(tmp_path, "torch", f"__version__ = {version!r}\n")


def _setup_py(tmp_path, env_extra, fakes=None):
    env = dict(os.environ, **env_extra)
    if fakes:  # (a _fake_package folder)
        env["PYTHONPATH"] = fakes
    return subprocess.run([sys.executable, os.path.join(ROOT, "setup.py"), "--name"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)


def test_build_stops_on_an_unsupported_torch_before_touching_anything(tmp_path):
    out = _setup_py(tmp_path, {}, _fake_torch(tmp_path, "2.5.1"))
    assert out.returncode != 0
    assert "fused_optim supports torch 2.8 to 2.15; this environment has torch 2.5.1" in out.stderr
    assert not list(tmp_path.glob("build*"))


def test_build_without_torch_says_to_install_it_and_keep_the_build_unisolated(tmp_path):
    # what an isolated build environment looks like to setup.py: no torch to import
    fake = _fake_package(tmp_path, "torch",
                         "raise ModuleNotFoundError(\"No module named 'torch'\")\n")
    out = _setup_py(tmp_path, {}, fake)
    assert out.returncode != 0
    assert "building needs PyTorch installed in this environment" in out.stderr
    assert "--no-build-isolation" in out.stderr


def test_build_with_an_old_setuptools_says_to_upgrade_it(tmp_path):
    # (setuptools 65, Python 3.10's own, refuses pyproject.toml's SPDX license with a schema
    # error that does not say what to do)
    fake = _fake_package(tmp_path, "setuptools",
                         "__version__ = '65.5.0'\ndef setup(**kwargs): pass\n")
    out = _setup_py(tmp_path, {}, fake)
    assert out.returncode != 0
    assert ("building needs setuptools 77 or later, and this environment has setuptools "
            "65.5.0") in out.stderr
    assert 'pip install "setuptools>=77"' in out.stderr


def test_build_without_a_compiler_says_so(tmp_path):
    out = _setup_py(tmp_path, {"CXX": str(tmp_path / "no-such-c++")})
    assert out.returncode != 0
    assert "building needs a C++20 compiler" in out.stderr and "no-such-c++" in out.stderr


def test_a_setup_command_that_builds_nothing_leaves_the_build_record(tmp_path):
    # fused_optim/_build_info.py records the torch (and CUDA) the library there was built
    # with, for the import's "rebuild" check: only a finished build writes it (setup.py's
    # BuildExt), not `setup.py --name` with other options, nor a failed build.
    info = os.path.join(ROOT, "fused_optim", "_build_info.py")
    before = open(info).read() if os.path.exists(info) else None
    out = _setup_py(tmp_path, {"FUSED_OPTIM_CUDA": "0"})
    assert out.returncode == 0, out.stderr
    assert (open(info).read() if os.path.exists(info) else None) == before


@pytest.fixture
def setup_module(monkeypatch):
    """setup.py imported as a module (its setup() call runs only as __main__)."""
    spec = importlib.util.spec_from_file_location("fused_optim_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _toolkit(tmp_path, release):
    bin_dir = tmp_path / "cuda" / "bin"
    bin_dir.mkdir(parents=True)
    nvcc = bin_dir / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n")
    nvcc.chmod(0o755)
    return str(tmp_path / "cuda")


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs a POSIX shell for the fake nvcc")
def test_cuda_auto_builds_for_the_cpu_when_the_toolkit_does_not_match(setup_module, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setattr(setup_module, "CUDA_HOME", _toolkit(tmp_path, "13.0"))
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setenv("FUSED_OPTIM_CUDA", "auto")
    with pytest.warns(UserWarning, match="building without the CUDA kernels") as record:
        with_cuda, why = setup_module.want_cuda()
    assert not with_cuda
    assert "CUDA 13.0" in why and "CUDA 12.8" in why
    assert "FUSED_OPTIM_CUDA=1" in str(record[0].message)
    # FUSED_OPTIM_CUDA=1: the same situation is an error, with the same reason
    monkeypatch.setenv("FUSED_OPTIM_CUDA", "1")
    with pytest.raises(SystemExit, match="cannot be built: the CUDA toolkit .* is CUDA 13.0"):
        setup_module.want_cuda()
    # a toolkit of torch's major version builds them (a minor difference is fine for torch)
    monkeypatch.setattr(torch.version, "cuda", "13.2")
    for mode in ("auto", "1"):
        monkeypatch.setenv("FUSED_OPTIM_CUDA", mode)
        assert setup_module.want_cuda() == (True, None)
    monkeypatch.setenv("FUSED_OPTIM_CUDA", "0")
    assert setup_module.want_cuda()[0] is False


def test_cuda_auto_on_a_cpu_torch_is_a_quiet_cpu_build(setup_module, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setenv("FUSED_OPTIM_CUDA", "auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with_cuda, why = setup_module.want_cuda()
    assert not with_cuda and "not a CUDA build" in why
    monkeypatch.setenv("FUSED_OPTIM_CUDA", "1")
    with pytest.raises(SystemExit, match="not a CUDA build"):
        setup_module.want_cuda()


def test_every_build_compiles(setup_module):
    # Without ninja, distutils skips an extension whose library looks newer than its
    # sources: a rebuild after a torch upgrade would keep the old library (BuildExt).
    from setuptools import Distribution
    cmd = setup_module.BuildExt(Distribution({"ext_modules": []}))
    cmd.ensure_finalized()
    assert cmd.force
