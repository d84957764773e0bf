"""The drafter kinds this package ships, registered through the
``mlx_lm_dspark.drafters`` entry-point group like any third-party kind.

A kind is an object with a ``name``, ``recognise(config) -> bool`` (config.json
alone decides) and ``build(config) -> nn.Module`` (an unloaded drafter that
follows ``protocol.DrafterProtocol``).
"""

from dataclasses import dataclass
from typing import Callable

from .config import drafter_args, is_eagle3_config, layout_of, speculators_args


@dataclass(frozen=True)
class DrafterKind:
    name: str
    recognise: Callable[[dict], bool]
    build: Callable[[dict], object]


def _markov_rank(config: dict) -> int:
    if layout_of(config) == "speculators":
        return int(speculators_args(config).get("markov_rank") or 0)
    nested = config.get("dflash_config") or {}
    return int(nested.get("markov_rank", config.get("markov_rank", 0)) or 0)


def _build(config: dict):
    from .drafter import Drafter, ModelArgs

    return Drafter(ModelArgs.from_dict(drafter_args(config)))


def _is_dspark(config: dict) -> bool:
    layout = layout_of(config)
    return layout in ("deepspec", "dflash_config", "speculators") and _markov_rank(config) > 0


def _is_dflash(config: dict) -> bool:
    layout = layout_of(config)
    return layout == "zlab" or (layout is not None and _markov_rank(config) == 0)


def _build_eagle3(config: dict):
    from .eagle3 import Eagle3Drafter, ModelArgs, eagle3_args

    return Eagle3Drafter(ModelArgs.from_dict(eagle3_args(config)))


DSPARK = DrafterKind("dspark", _is_dspark, _build)
DFLASH = DrafterKind("dflash", _is_dflash, _build)
EAGLE3 = DrafterKind("eagle3", is_eagle3_config, _build_eagle3)
