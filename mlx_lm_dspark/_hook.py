"""Lazy activation: patch host libraries the moment their modules load.

This module runs at every Python start (through ``mlx_lm_dspark.pth``), so it
imports nothing heavy (not even ``importlib.abc``, which pulls in
``importlib.resources``; the finder and loader are duck-typed): the patches (and mlx itself) load only when the user
imports one of the host modules listed in ``HOST_PATCHES``.
"""

import importlib
import os
import sys

# host module -> "module:function" applied right after the host module executes
HOST_PATCHES = {
    "mlx_lm.sample_utils": "mlx_lm_dspark.hosts.mlx_lm:patch_sample_utils",
    "mlx_lm.utils": "mlx_lm_dspark.hosts.mlx_lm:patch_utils",
    "mlx_lm.generate": "mlx_lm_dspark.hosts.mlx_lm:patch_generate",
    "mlx_lm.server": "mlx_lm_dspark.hosts.mlx_lm:patch_server",
    "mlx_vlm.speculative.drafters": "mlx_lm_dspark.hosts.mlx_vlm:patch_drafters",
    "mlx_vlm.generate.ar": "mlx_lm_dspark.hosts.mlx_vlm:patch_ar",
    "mlx_vlm.generate.dispatch": "mlx_lm_dspark.hosts.mlx_vlm:patch_dispatch",
    "mlx_vlm.server.cli": "mlx_lm_dspark.hosts.mlx_vlm:patch_server_cli",
}


def disabled() -> bool:
    return os.environ.get("MLX_LM_DSPARK_DISABLE", "").strip() not in ("", "0")


def _apply(module_name, module):
    target = HOST_PATCHES[module_name]
    patch_module, _, func = target.partition(":")
    patcher = getattr(importlib.import_module(patch_module), func)
    patcher(module)


class _PatchingLoader:
    """Runs the host's own loader, then our patch for that module."""

    def __init__(self, loader, name):
        self._loader = loader
        self._name = name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _apply(self._name, module)

    def __getattr__(self, attr):
        # get_code / get_source / is_package etc. stay the host loader's.
        return getattr(self._loader, attr)


class _HostFinder:
    def find_spec(self, fullname, path, target=None):
        if fullname not in HOST_PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchingLoader(spec.loader, fullname)
                return spec
        return None


_FINDER = _HostFinder()


def install() -> bool:
    """Install the import hook; patch host modules that are already loaded."""
    if disabled():
        return False
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
    for name in HOST_PATCHES:
        module = sys.modules.get(name)
        if module is not None and not getattr(module, "_mlx_lm_dspark_patched", False):
            _apply(name, module)
    return True
