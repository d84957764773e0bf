"""The drafter protocol: every drafter kind implements it, and ``is_drafter``
asks it."""

import mlx_lm
import pytest

from mlx_lm_dspark import load_drafter
from mlx_lm_dspark.protocol import DrafterProtocol
from mlx_lm_dspark.speculative import is_drafter
from mlx_lm_dspark.target import text_args
from mlx_lm_dspark_tools.tiny import build_pair
from drafters import ModelDrafter, TableDrafter
from mlx_lm_dspark_tools.oracle import OracleDrafter


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    target_dir, drafter_dir = build_pair(tmp_path_factory.mktemp("protocol"), family="qwen3")
    model, _ = mlx_lm.load(str(target_dir))
    return model, drafter_dir


def test_our_drafter_satisfies_the_protocol(pair):
    _, drafter_dir = pair
    drafter = load_drafter(drafter_dir, bits=None)
    assert isinstance(drafter, DrafterProtocol) and is_drafter(drafter)


def test_the_oracles_satisfy_the_protocol(pair):
    import mlx.core as mx

    model, drafter_dir = pair
    args = text_args(model)
    oracles = [
        OracleDrafter(args, [1, 2, 3], right=lambda pos: True),
        ModelDrafter(model, args),
        TableDrafter(mx.zeros((args["vocab_size"], args["vocab_size"])), args),
        OracleDrafter(args, acceptance=0.5, confidence=0.5),
        OracleDrafter(None, acceptance=0.5, confidence=0.5, inner=load_drafter(drafter_dir, bits=None)),
    ]
    for oracle in oracles:
        assert isinstance(oracle, DrafterProtocol) and is_drafter(oracle), type(oracle).__name__


@pytest.mark.parametrize("missing", ["make_cache", "add_context", "propose", "max_drafts", "target_layer_ids",
                                     "confidence_threshold", "block_size", "kind", "args"])
def test_a_member_missing_is_not_a_drafter(pair, missing):
    model, _ = pair
    oracle = OracleDrafter(text_args(model), [1, 2, 3], right=lambda pos: True)
    members = {name: getattr(oracle, name) for name in dir(oracle) if not name.startswith("__")}
    del members[missing]
    partial = type("Partial", (), members)()
    assert not isinstance(partial, DrafterProtocol) and not is_drafter(partial)
    assert not is_drafter(model)  # a target model is no drafter
