"""DSpark / DFlash speculative decoding for mlx-lm.

Importing this package activates the mlx-lm integration (the same thing the
installed ``mlx_lm_dspark.pth`` does at start-up); the public API below is
loaded lazily so that activation never imports mlx on its own.
"""

from ._hook import install as _install

__version__ = "0.1.0"

_LAZY = {
    "load_drafter": "mlx_lm_dspark.loader",
    "is_drafter_config": "mlx_lm_dspark.loader",
    "Drafter": "mlx_lm_dspark.drafter",
    "speculative_generate_step": "mlx_lm_dspark.speculative",
    "last_stats": "mlx_lm_dspark.session",
    "DrafterMismatchError": "mlx_lm_dspark.target",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mlx_lm_dspark' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


_install()
