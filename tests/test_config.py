import json

import pytest

from mlx_lm_dspark.config import drafter_args, is_drafter_config, layout_of


def _config(path):
    return json.loads((path / "config.json").read_text())


def test_layout_recognised_from_config_alone(qwen3_dirs, fixtures_dir):
    for name in ("qwen3_tiny_dspark", "gemma4_tiny_dspark", "qwen3_tiny_dflash"):
        assert layout_of(_config(fixtures_dir / name)) == "deepspec"
    assert layout_of(_config(qwen3_dirs["dflash_config"][1])) == "dflash_config"
    assert layout_of(_config(qwen3_dirs["zlab"][1])) == "zlab"
    assert not is_drafter_config(_config(qwen3_dirs["deepspec"][0]))  # the target itself
    assert not is_drafter_config(_config(fixtures_dir / "e2e_bigram" / "target"))

    zlab = drafter_args(_config(qwen3_dirs["zlab"][1]))
    assert zlab["shifted_alignment"] and not zlab["has_embeddings"] and zlab["markov_rank"] == 0
    nested = drafter_args(_config(qwen3_dirs["dflash_config"][1]))
    assert nested["markov_rank"] > 0 and nested["target_layer_ids"] == _config(
        qwen3_dirs["dflash_config"][1])["dflash_config"]["target_layer_ids"]


def test_unsupported_or_incomplete_configs_are_explained():
    zlab_llama = {"architectures": ["DFlashDraftModel"], "model_type": "llama",
                  "dflash_config": {"target_layer_ids": [1], "mask_token_id": 5}}
    with pytest.raises(ValueError, match="'llama'"):
        drafter_args(zlab_llama)
    incomplete = {"architectures": ["Qwen3DSparkModel"], "model_type": "qwen3", "block_size": 7}
    with pytest.raises(ValueError, match="target_layer_ids, mask_token_id"):
        drafter_args(incomplete)
    with pytest.raises(ValueError, match="Not a DSpark/DFlash drafter"):
        drafter_args({"model_type": "qwen3"})
