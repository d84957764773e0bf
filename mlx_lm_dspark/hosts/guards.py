"""What every host patch checks before it patches: the host's version and the
shape of each function it replaces.

The patches are written against a range of host releases; outside it, or when
a patched function no longer looks the way the patch expects, they raise
``HostMismatchError`` naming the installed version, the supported range and
the way to run the host without us (``MLX_LM_DSPARK_DISABLE=1``).  A silent
mismatch could change what users' generations return.
"""

import importlib
import inspect
import re

# host distribution -> (lowest supported release, first unsupported release)
SUPPORTED = {
    "mlx-lm": ("0.31.3", "0.33.0"),
    "mlx-vlm": ("0.7.10", "0.7.11"),
}

# host distribution -> the module holding its ``__version__``
VERSION_MODULES = {
    "mlx-lm": "mlx_lm._version",
    "mlx-vlm": "mlx_vlm.version",
}

DISABLE_HINT = "set MLX_LM_DSPARK_DISABLE=1 to run {host} without it"


class HostMismatchError(RuntimeError):
    """A host library is not one the patches were written for."""


def supported_range(host: str) -> str:
    low, high = SUPPORTED[host]
    return f">={low},<{high}"


def installed_version(host: str) -> str:
    """The version of the host code that is running (its own ``__version__``,
    which a source checkout on ``sys.path`` also has), else its metadata."""
    try:
        return str(importlib.import_module(VERSION_MODULES[host]).__version__)
    except Exception:
        pass
    try:
        from importlib.metadata import version

        return version(host)
    except Exception:
        return "unknown"


def release(version: str):
    """``"0.32.2"`` -> ``(0, 32, 2)``; missing parts count as 0 and anything
    after the numbers (``rc1``, ``.dev0``) is ignored; None if not a version."""
    match = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", version)
    if match is None:
        return None
    return tuple(int(part or 0) for part in match.groups())


def in_range(host: str, version: str) -> bool:
    low, high = SUPPORTED[host]
    parsed = release(version)
    return parsed is not None and release(low) <= parsed < release(high)


def refusal(host: str, what: str, detail: str, version: str = None) -> HostMismatchError:
    version = installed_version(host) if version is None else version
    return HostMismatchError(
        f"mlx-lm-dspark cannot patch {what}: {detail}. Installed {host} is {version}; this "
        f"release supports {host} {supported_range(host)}. Install a supported version, upgrade "
        f"mlx-lm-dspark, or {DISABLE_HINT.format(host=host)}."
    )


def fail(host: str, what: str, detail: str):
    raise refusal(host, what, detail)


def check_version(host: str, what: str, version: str = None) -> None:
    """Refuse to patch ``what`` unless the running ``host`` lies in the
    supported range (``version`` overrides the installed one, for tests)."""
    version = installed_version(host) if version is None else version
    if not in_range(host, version):
        raise refusal(host, what, "its version is outside the supported range", version)


def once(module, host: str) -> bool:
    """True the first time ``module`` is to be patched, after checking the
    running ``host`` version; marks the module so it is patched only once."""
    if getattr(module, "_mlx_lm_dspark_patched", False):
        return False
    check_version(host, module.__name__)
    module._mlx_lm_dspark_patched = True
    return True


def expect_params(module, name: str, params, fail):
    """``module.name``, after checking it is still a function that takes
    ``params``; ``fail(what, detail)`` raises the host's refusal otherwise."""
    func = getattr(module, name, None)
    if not callable(func):
        fail(f"{module.__name__}.{name}", "the function no longer exists")
    have = list(inspect.signature(func).parameters)
    missing = [p for p in params if p not in have]
    if missing:
        fail(f"{module.__name__}.{name}", f"parameters {missing} are gone (it now takes {have})")
    return func


def expect_shape(func, what: str, shapes, fail):
    """Check that ``func`` takes exactly one of the parameter lists in
    ``shapes`` (each release's shape, known to the patch), in order."""
    have = list(inspect.signature(func).parameters)
    if have not in [list(shape) for shape in shapes]:
        known = " or ".join(str(list(shape)) for shape in shapes)
        fail(what, f"it takes {have}, not one of the known shapes {known}")
    return func


def expect_calls(func, what: str, callees, fail):
    """Check that ``func`` still calls ``callees`` through its module's
    globals (the names a patch replaces there)."""
    names = set(func.__code__.co_names)
    missing = [c for c in callees if c not in names]
    if missing:
        fail(what, f"it no longer calls {missing} through module globals")
