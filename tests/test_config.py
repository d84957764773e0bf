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


@pytest.mark.parametrize("where", ["top", "nested"])
def test_zlab_settings_follow_its_reference(qwen3_dirs, where):
    """z-lab's sliding layers are causal unless ``is_causal`` says otherwise;
    its embedding / output factors and soft-cap are read where its
    reference reads them (``dflash_config`` first, then the top level)."""
    config = _config(qwen3_dirs["zlab"][1])
    assert drafter_args(config)["causal_layer_types"] == ["sliding_attention"]
    assert "input_embedding_scale" not in drafter_args(config)

    def with_fields(**fields):
        c = json.loads(json.dumps(config))
        (c["dflash_config"] if where == "nested" else c).update(fields)
        return drafter_args(c)

    assert with_fields(is_causal=False)["causal_layer_types"] == []
    assert with_fields(is_causal=True)["causal_layer_types"] == ["full_attention", "sliding_attention"]
    scaled = with_fields(input_embedding_scale=8.0, output_multiplier=0.5, final_logit_softcapping=30.0)
    assert (scaled["input_embedding_scale"], scaled["output_multiplier"], scaled["final_logit_softcapping"]) == (8.0, 0.5, 30.0)
    with pytest.raises(ValueError, match="is_causal is 'yes', expected true or false"):
        with_fields(is_causal="yes")
    with pytest.raises(ValueError, match="input_embedding_scale is -1, expected a number > 0"):
        with_fields(input_embedding_scale=-1)
    # DeepSpec's own layout keeps its bidirectional block.
    assert "causal_layer_types" not in drafter_args(_config(qwen3_dirs["deepspec"][1]))


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


# --------------------------------------------------------------- malformed checkpoints

def _set(**fields):
    def mutate(config):
        config.update(fields)
        return config
    return mutate


def _drop(*keys):
    def mutate(config):
        for key in keys:
            config.pop(key)
        return config
    return mutate


MALFORMED = [
    ("mask_outside_vocab", _set(mask_token_id=512), "mask_token_id is 512, outside the vocabulary"),
    ("mask_negative", _set(mask_token_id=-1), "mask_token_id is -1"),
    ("block_negative", _set(block_size=-3), "block_size is -3, expected an integer >= 1"),
    ("block_zero", _set(block_size=0), "block_size is 0"),
    ("duplicate_taps", _set(target_layer_ids=[1, 1, 1]), "distinct"),
    ("float_taps", _set(target_layer_ids=[1.5]), "target_layer_ids is [1.5]"),
    ("string_taps", _set(target_layer_ids=["135"]), "target_layer_ids is ['135']"),
    ("empty_taps", _set(target_layer_ids=[]), "non-empty list"),
    ("taps_beyond_target", _set(target_layer_ids=[1, 8]), "beyond num_target_layers 8"),
    ("string_block", _set(block_size="7"), "block_size is '7'"),
    ("string_hidden", _set(hidden_size="64"), "hidden_size is '64'"),
    ("string_mask", _set(mask_token_id="500"), "mask_token_id is '500'"),
    ("string_eps", _set(rms_norm_eps="1e-6"), "rms_norm_eps is '1e-6'"),
    ("bool_block", _set(block_size=True), "block_size is True"),
    ("nan_eps", _set(rms_norm_eps=float("nan")), "rms_norm_eps is nan"),
    ("missing_hidden", _drop("hidden_size"), "missing hidden_size"),
    ("missing_vocab", _drop("vocab_size"), "missing vocab_size"),
    ("heads", _set(num_key_value_heads=3), "not a multiple of num_key_value_heads 3"),
    ("layer_types", _set(layer_types="full_attention"), "layer_types is 'full_attention'"),
    ("markov_rank", _set(markov_rank=-2), "markov_rank is -2"),
]


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    from mlx_lm_dspark_tools.tiny import build_pair

    return build_pair(tmp_path_factory.mktemp("malformed"), family="qwen3", target_layer_ids=(1, 3, 5))


def _copy_drafter(drafter_dir, where, config=None):
    import shutil

    where.mkdir(parents=True)
    shutil.copy(drafter_dir / "model.safetensors", where / "model.safetensors")
    config = _config(drafter_dir) if config is None else config
    (where / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return where


@pytest.mark.parametrize("name,mutate,message", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_every_malformed_field_is_named_in_one_line(tiny_pair, tmp_path, name, mutate, message):
    from mlx_lm_dspark.config import DrafterConfigError
    from mlx_lm_dspark.loader import load_drafter

    _, drafter_dir = tiny_pair
    bad = _copy_drafter(drafter_dir, tmp_path / "drafter", mutate(_config(drafter_dir)))
    with pytest.raises(DrafterConfigError) as caught:
        load_drafter(bad, bits=None)
    text = str(caught.value)
    assert message in text and "\n" not in text
    assert f"the checkpoint at {bad} is malformed" in text


@pytest.mark.parametrize("layout", ["dflash_config", "zlab"])
def test_nested_fields_are_checked_too(tmp_path, layout):
    from mlx_lm_dspark.config import DrafterConfigError
    from mlx_lm_dspark_tools.tiny import build_pair

    _, drafter_dir = build_pair(tmp_path / "pair", family="qwen3", layout=layout)
    config = _config(drafter_dir)
    config["dflash_config"]["mask_token_id"] = 10_000
    with pytest.raises(DrafterConfigError, match="mask_token_id is 10000, outside the vocabulary"):
        drafter_args(config, source=drafter_dir)


def test_a_drafter_path_with_glob_characters_loads(tiny_pair, tmp_path):
    from mlx_lm_dspark.loader import load_drafter

    _, drafter_dir = tiny_pair
    odd = _copy_drafter(drafter_dir, tmp_path / "drafter [v2]")
    assert load_drafter(odd, bits=None).kind == "dspark"


@pytest.mark.parametrize("text,message", [("[1, 2, 3]", "holds a JSON list, not an object"),
                                          ('{"block_size": 7,', "is not valid JSON"),
                                          ("\udcff", "is not valid JSON")])
def test_a_config_that_is_not_a_json_object_is_named(tiny_pair, tmp_path, text, message):
    from mlx_lm_dspark.config import DrafterConfigError
    from mlx_lm_dspark.loader import load_drafter

    _, drafter_dir = tiny_pair
    where = _copy_drafter(drafter_dir, tmp_path / "drafter", "")
    (where / "config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(DrafterConfigError, match=message) as caught:
        load_drafter(where, bits=None)
    assert "\n" not in str(caught.value) and str(where / "config.json") in str(caught.value)


@pytest.mark.parametrize("damage,message", [("truncate", "truncated or damaged"),
                                            ("header", "truncated or damaged"),
                                            ("missing", "No model\\*.safetensors")])
def test_damaged_or_missing_weights_are_named(tiny_pair, tmp_path, damage, message):
    from mlx_lm_dspark.config import DrafterConfigError
    from mlx_lm_dspark.loader import load_drafter

    _, drafter_dir = tiny_pair
    where = _copy_drafter(drafter_dir, tmp_path / "drafter")
    weights = where / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "header":
        weights.write_bytes(data[:20] + b"\xff" * 10 + data[30:])
    else:
        weights.unlink()
    with pytest.raises(DrafterConfigError, match=message) as caught:
        load_drafter(where, bits=None)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("config", [
    {"architectures": ["LlamaEagle3Model"], "model_type": "llama", "target_layer_ids": [1, 2, 3]},
    {"architectures": ["MedusaDraftModel"], "model_type": "qwen3"},
    {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "ttt_length": 7},
])
def test_unknown_drafter_architectures_list_what_is_recognised(tmp_path, config):
    import json

    import mlx_lm

    from mlx_lm_dspark.config import DrafterConfigError, is_drafter_config, looks_like_drafter

    assert looks_like_drafter(config) and is_drafter_config(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(DrafterConfigError) as caught:
        mlx_lm.load(str(tmp_path))
    text = str(caught.value)
    assert "\n" not in text and "does not run" in text and "recognises" in text
    for name in ("Qwen3DSparkModel", "Gemma4Eagle3Model", "DFlashDraftModel", "speculators_model_type"):
        assert name in text


def test_plain_models_are_not_taken_for_drafters():
    from mlx_lm_dspark.config import looks_like_drafter

    assert not looks_like_drafter({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"})
    assert not looks_like_drafter({"architectures": ["Gemma4ForConditionalGeneration"], "model_type": "gemma4"})
