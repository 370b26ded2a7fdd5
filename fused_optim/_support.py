"""The torch and Python releases fused_optim supports: one place, read by setup.py (at build
time, without importing the package) and by the loader (at import).

torch is deliberately not a declared dependency (pyproject.toml): installing fused_optim
never installs, upgrades or downgrades torch. The build uses the torch it finds, and these
checks say plainly when that torch is outside the supported range.
"""
import re

# The oldest torch the whole test suite passes on, and the newest one tested (CI runs the
# smoke suite on TORCH_OLDEST and the whole suite on a release in between; docs/install.md).
TORCH_OLDEST = (2, 8)
TORCH_NEWEST_TESTED = (2, 15)
PYTHON_OLDEST = (3, 10)
PYTHON_NEWEST_TESTED = (3, 13)

_WHAT_TO_DO = (
    "Install a supported torch first (for example `pip install torch==2.13.0`), then rebuild "
    "fused_optim against it: `pip install --no-build-isolation -e .` from its source tree."
)


def _release(version: str):
    """(major, minor) of a version string such as '2.13.0+cpu' or '2.9.0a0+git1234'."""
    m = re.match(r"(\d+)\.(\d+)", version)
    if m is None:
        raise ValueError(f"cannot read a release from version {version!r}")
    return int(m.group(1)), int(m.group(2))


def _fmt(release):
    return ".".join(map(str, release))


def supported_range() -> str:
    return f"torch {_fmt(TORCH_OLDEST)} to {_fmt(TORCH_NEWEST_TESTED)}"


def torch_problem(version: str):
    """(error, warning) for a torch version: an error where the release is older than the
    oldest supported one (the build stops; the import raises), a warning where it is newer
    than the newest tested one (it may well work: nothing stops it). None where all is well."""
    release = _release(version)
    if release < TORCH_OLDEST:
        return (f"fused_optim supports {supported_range()}; this environment has torch {version}. "
                + _WHAT_TO_DO), None
    if release > TORCH_NEWEST_TESTED:
        return None, (f"fused_optim was tested with {supported_range()}; this environment has "
                      f"torch {version}, which is newer. It may work; if it does not, please "
                      f"report it, and use a tested torch meanwhile.")
    return None, None


def python_problem(version_info):
    """The same for a Python version (sys.version_info)."""
    release = tuple(version_info[:2])
    if release < PYTHON_OLDEST:
        return (f"fused_optim supports Python {_fmt(PYTHON_OLDEST)} to "
                f"{_fmt(PYTHON_NEWEST_TESTED)}; this is Python {_fmt(release)}."), None
    if release > PYTHON_NEWEST_TESTED:
        return None, (f"fused_optim was tested with Python {_fmt(PYTHON_OLDEST)} to "
                      f"{_fmt(PYTHON_NEWEST_TESTED)}; this is Python {_fmt(release)}.")
    return None, None
