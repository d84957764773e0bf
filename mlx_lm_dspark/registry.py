"""Drafter kinds from the ``mlx_lm_dspark.drafters`` entry-point group."""

import functools
import warnings
from importlib.metadata import entry_points
from typing import Optional

GROUP = "mlx_lm_dspark.drafters"
BUILTIN_MODULE = "mlx_lm_dspark.kinds"


@functools.lru_cache(maxsize=1)
def drafter_kinds() -> tuple:
    """Every registered kind; third-party kinds come before ours so they can
    claim a layout we would otherwise take."""
    found = []
    for ep in entry_points(group=GROUP):
        try:
            kind = ep.load()
        except Exception as e:  # a broken plugin must not break mlx-lm
            warnings.warn(f"mlx-lm-dspark: drafter kind {ep.name!r} failed to load: {e!r}")
            continue
        for attr in ("name", "recognise", "build"):
            if not hasattr(kind, attr):
                raise TypeError(
                    f"Drafter kind {ep.name!r} ({ep.value}) has no {attr!r}; a kind "
                    "needs name, recognise(config) and build(config)."
                )
        found.append((ep.value.startswith(BUILTIN_MODULE), ep.name, kind))
    # Our own kinds are known even where the installed metadata lacks them:
    # a source tree that was never installed, or one newer than its install.
    from . import kinds

    registered = {name for builtin, name, _ in found if builtin}
    found += [(True, k.name, k) for k in (kinds.DSPARK, kinds.DFLASH, kinds.EAGLE3) if k.name not in registered]
    found.sort(key=lambda t: (t[0], t[1]))
    return tuple(kind for _, _, kind in found)


def kind_for(config: dict) -> Optional[object]:
    for kind in drafter_kinds():
        if kind.recognise(config):
            return kind
    return None


def kind_named(name: str):
    for kind in drafter_kinds():
        if kind.name == name:
            return kind
    names = ", ".join(k.name for k in drafter_kinds())
    raise ValueError(f"Unknown drafter kind {name!r}; registered kinds: {names}.")
