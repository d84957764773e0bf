"""The tiny checkpoints other tests build on: they must load and run through
mlx-lm like real ones, and drafters must match the released layouts."""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx_lm
import pytest
from mlx_lm.generate import stream_generate
from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache
from mlx_lm.utils import load_tokenizer

import mlx_lm_dspark_tools.tiny as tm
from conftest import needs_gemma4_unified

PROMPT = "the quick brown fox jumps over the lazy dog and the cat"
TOKENS = mx.array([[5, 9, 33, 4, 70, 211, 17, 300, 8, 42, 99, 123]])  # longer than the 8-token window
MAX = 40

TARGETS = {
    "qwen3": (tm.make_qwen3_target, {}),
    "qwen3_4bit": (tm.make_qwen3_target, {"bits": 4}),
    "gemma4": (tm.make_gemma4_target, {}),
    "gemma4_4bit": (tm.make_gemma4_target, {"bits": 4}),
    "gemma4_text": (tm.make_gemma4_target, {"model_type": "gemma4_text"}),
    "gemma4_unified": (tm.make_gemma4_target, {"model_type": "gemma4_unified"}),
    "gemma4_k_eq_v_ple": (tm.make_gemma4_target, {"attention_k_eq_v": True, "hidden_size_per_layer_input": 8}),
}


def config_of(path):
    return json.loads((Path(path) / "config.json").read_text())


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    """name -> (in-memory model, saved dir, mlx_lm.load result), built lazily."""
    built = {}

    def get(name):
        if name not in built:
            make, kw = TARGETS[name]
            model, config = make(**kw)
            path = tmp_path_factory.mktemp(name)
            tm.save_target(path, model, config)
            built[name] = (model, path, mlx_lm.load(str(path)))
        return built[name]

    return get


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_and_fills_the_vocab(tmp_path):
    tm.write_tokenizer(tmp_path, vocab_size=512)
    tok = load_tokenizer(tmp_path)
    assert tok.vocab_size == len(tok._tokenizer) == 512  # mlx-lm 0.31's wrapper has no len()
    assert tok.eos_token_id == tm.EOS_ID and tok.eos_token_ids == {tm.EOS_ID}
    assert tok.bos_token_id is None and not tok.has_chat_template
    ids = tok.encode(PROMPT)
    assert tm.UNK_ID not in ids and tok.decode(ids) == PROMPT
    # Unknown words split into WordPiece pieces instead of becoming <unk>.
    odd = tok.encode("Xylophones quietly zigzag")
    assert tm.UNK_ID not in odd and tok.decode(odd) == "xylophones quietly zigzag"
    # Every id decodes to text, so any generated id prints readably.
    assert all(tok.decode([i]) for i in range(512))
    detok = tok.detokenizer
    for t in ids:
        detok.add_token(t)
    detok.finalize()
    assert detok.text == PROMPT


# ---------------------------------------------------------------- targets


@pytest.mark.parametrize("name", [pytest.param(n, marks=needs_gemma4_unified) if n == "gemma4_unified" else n
                                  for n in TARGETS])
def test_target_reloads_with_identical_logits(targets, name):
    model, path, (loaded, tokenizer) = targets(name)
    assert type(loaded) is type(model)
    assert mx.array_equal(loaded(TOKENS), model(TOKENS))
    assert tokenizer.vocab_size == 512 and tokenizer.eos_token_ids == {tm.EOS_ID}
    config = config_of(path)
    assert config["eos_token_id"] == tm.EOS_ID
    quantized = "4bit" in name
    assert ("quantization" in config) == quantized
    if quantized:
        assert config["quantization"]["bits"] == 4
        assert any(k.endswith(".scales") for k in mx.load(str(path / "model.safetensors")))


@pytest.mark.parametrize("name", ["qwen3", "qwen3_4bit", "gemma4", "gemma4_4bit", "gemma4_text",
                                  pytest.param("gemma4_unified", marks=needs_gemma4_unified)])
def test_greedy_generation_is_varied_and_runs_to_max_tokens(targets, name):
    _, _, (model, tokenizer) = targets(name)
    responses = list(stream_generate(model, tokenizer, PROMPT, max_tokens=MAX))
    tokens = [r.token for r in responses]
    assert len(tokens) == MAX and responses[-1].finish_reason == "length"
    assert tm.EOS_ID not in tokens
    assert len(set(tokens)) >= 15, tokens
    text = mlx_lm.generate(model, tokenizer, PROMPT, max_tokens=MAX)
    assert text == "".join(r.text for r in responses) and len(text.split()) >= 20


@pytest.mark.parametrize("name", ["gemma4", "gemma4_4bit", "gemma4_text",
                                  pytest.param("gemma4_unified", marks=needs_gemma4_unified)])
def test_gemma4_cache_has_shared_and_rotating_layers(targets, name):
    _, path, (model, tokenizer) = targets(name)
    text = tm.text_config_of(config_of(path))
    assert text["final_logit_softcapping"] == 30.0
    cache = make_prompt_cache(model)
    assert len(cache) == len(model.layers) - text["num_kv_shared_layers"] < len(model.layers)
    rotating = [c for c in cache if isinstance(c, RotatingKVCache)]
    assert rotating and all(c.max_size < MAX for c in rotating)
    assert any(type(c) is KVCache for c in cache)
    list(stream_generate(model, tokenizer, PROMPT, max_tokens=MAX, prompt_cache=cache))
    assert all(c.offset > c.max_size for c in rotating)  # the window wrapped


@needs_gemma4_unified
def test_model_type_as_loaded(targets):
    assert targets("gemma4_unified")[2][0].model_type == "gemma4_unified"
    assert config_of(targets("gemma4_unified")[1])["model_type"] == "gemma4_unified"
    assert not hasattr(targets("gemma4_text")[2][0], "language_model")


def test_seed_makes_identical_checkpoints(tmp_path):
    a = tm.save_qwen3_target(tmp_path / "a", num_layers=2, seed=3)
    b = tm.save_qwen3_target(tmp_path / "b", num_layers=2, seed=3)
    c = tm.save_qwen3_target(tmp_path / "c", num_layers=2, seed=4)
    assert a == b == c
    wa, wb, wc = (mx.load(str(tmp_path / n / "model.safetensors")) for n in "abc")
    assert all(mx.array_equal(wa[k], wb[k]) for k in wa)
    assert not mx.array_equal(wa["lm_head.weight"], wc["lm_head.weight"])


def test_console_script_matches_python_api(targets):
    _, path, (model, tokenizer) = targets("qwen3")
    script = Path(sys.executable).parent / "mlx_lm.generate"
    proc = subprocess.run([str(script), "--model", str(path), "--prompt", PROMPT, "--max-tokens", "20"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("==========")[1].strip() == mlx_lm.generate(model, tokenizer, PROMPT, max_tokens=20)


# ---------------------------------------------------------------- drafters

FIXTURE_MATCH = [
    # (family, target kw, drafter kw, fixture with the same names and shapes)
    ("qwen3", {}, {}, "qwen3_tiny_dspark"),
    ("qwen3", {}, {"markov_rank": 0}, "qwen3_tiny_dflash"),
    ("gemma4", {"attention_k_eq_v": True}, {}, "gemma4_tiny_dspark"),
    ("gemma4", {}, {}, "gemma4_kv_tiny_dspark"),
]
DRAFTER_FIELDS = ["architectures", "model_type", "num_hidden_layers", "num_target_layers", "block_size",
                  "mask_token_id", "target_layer_ids", "markov_rank", "markov_head_type", "enable_confidence_head",
                  "confidence_head_with_markov", "tie_word_embeddings", "layer_types", "head_dim",
                  "global_head_dim", "attention_k_eq_v", "num_kv_shared_layers", "final_logit_softcapping",
                  "hidden_activation", "hidden_act", "num_global_key_value_heads"]


def shapes(weights):
    return {k: tuple(v.shape) for k, v in weights.items()}


@pytest.mark.parametrize("family,target_kw,drafter_kw,fixture", FIXTURE_MATCH, ids=[f[3] for f in FIXTURE_MATCH])
def test_deepspec_drafter_matches_fixture(tmp_path, fixtures_dir, family, target_kw, drafter_kw, fixture):
    target_dir, drafter_dir = tm.build_pair(tmp_path, family=family, **target_kw, **drafter_kw)
    weights = mx.load(str(drafter_dir / "model.safetensors"))
    assert shapes(weights) == shapes(mx.load(str(fixtures_dir / fixture / "model.safetensors")))
    mine, ref = config_of(drafter_dir), config_of(fixtures_dir / fixture)
    assert set(ref) - set(mine) <= {"transformers_version"}
    assert {k: mine.get(k) for k in DRAFTER_FIELDS} == {k: ref.get(k) for k in DRAFTER_FIELDS}
    assert "rope_theta" not in mine and mine["rope_parameters"]
    assert all(not mx.isnan(v).any().item() for v in weights.values())
    assert abs(weights["norm.weight"].mean().item() - 1.0) < 0.1
    # Embedding and head are the target's own (Gemma-4 ties them).
    target = mx.load(str(target_dir / "model.safetensors"))
    embed = next(v for k, v in target.items() if k.endswith("embed_tokens.weight"))
    head = next((v for k, v in target.items() if k.endswith("lm_head.weight")), embed)
    assert mx.array_equal(weights["embed_tokens.weight"], embed)
    assert mx.array_equal(weights["lm_head.weight"], head)


def test_drafter_of_quantized_target_gets_dequantized_head(tmp_path):
    target_dir, drafter_dir = tm.build_pair(tmp_path, family="qwen3", bits=4)
    model, _ = mlx_lm.load(str(target_dir))
    weights = mx.load(str(drafter_dir / "model.safetensors"))
    assert weights["lm_head.weight"].dtype == mx.float32
    hidden = mx.random.normal((3, 64))
    assert mx.allclose(hidden @ weights["lm_head.weight"].T, model.lm_head(hidden), atol=1e-4)
    assert mx.array_equal(model.model.embed_tokens(mx.array([7, 8])), weights["embed_tokens.weight"][mx.array([7, 8])])


NESTED = ["block_size", "target_layer_ids", "mask_token_id", "markov_rank", "enable_confidence_head",
          "confidence_head_with_markov", "num_target_layers"]


def test_dflash_config_layout_nests_the_drafter_fields(tmp_path):
    _, flat_dir = tm.build_pair(tmp_path / "flat", family="qwen3")
    _, nested_dir = tm.build_pair(tmp_path / "nested", family="qwen3", layout="dflash_config")
    flat, nested = config_of(flat_dir), config_of(nested_dir)
    assert nested["architectures"] == ["Qwen3DSparkModel"]
    assert all(k not in nested for k in NESTED)
    assert {k: nested["dflash_config"][k] for k in NESTED} == {k: flat[k] for k in NESTED}
    assert shapes(mx.load(str(nested_dir / "model.safetensors"))) == shapes(mx.load(str(flat_dir / "model.safetensors")))


def test_zlab_layout(tmp_path):
    _, drafter_dir = tm.build_pair(tmp_path, family="qwen3", layout="zlab")
    config = config_of(drafter_dir)
    assert config["architectures"] == ["DFlashDraftModel"] and config["model_type"] == "qwen3"
    assert config["block_size"] == 16 and config["num_target_layers"] == 8
    assert config["rope_theta"] == 1e6 and "rope_parameters" not in config
    assert config["dflash_config"] == {"target_layer_ids": [1, 3, 5], "mask_token_id": 500}
    assert not any(k.startswith(("markov", "enable_confidence", "confidence")) for k in config)
    names = set(mx.load(str(drafter_dir / "model.safetensors")))
    assert {"fc.weight", "hidden_norm.weight", "norm.weight", "layers.1.mlp.down_proj.weight"} <= names
    assert not any(n.startswith(("embed_tokens", "lm_head", "markov_head", "confidence_head")) for n in names)


def test_drafter_options_and_errors(tmp_path):
    target = tm.qwen3_config(vocab_size=512, hidden_size=64, num_layers=8, num_heads=4, num_kv_heads=2,
                             head_dim=16, intermediate_size=128, tie_word_embeddings=False)
    config = tm.save_drafter(tmp_path / "d", target, markov_rank=8, block_size=5, target_layer_ids=(0, 7),
                             num_drafter_layers=3, mask_token_id=7, confidence_head=False)
    weights = mx.load(str(tmp_path / "d" / "model.safetensors"))
    assert (config["block_size"], config["mask_token_id"], config["num_hidden_layers"]) == (5, 7, 3)
    assert weights["fc.weight"].shape == (64, 128) and weights["markov_head.markov_w1.weight"].shape == (512, 8)
    assert "layers.2.self_attn.q_proj.weight" in weights and "confidence_head.proj.weight" not in weights
    assert "confidence_head_with_markov" not in config
    with pytest.raises(ValueError, match="mask_token_id"):
        tm.save_drafter(tmp_path / "e", target, mask_token_id=512)
    with pytest.raises(ValueError, match="target_layer_ids"):
        tm.save_drafter(tmp_path / "e", target, target_layer_ids=(1, 8))
    with pytest.raises(ValueError, match="layout"):
        tm.save_drafter(tmp_path / "e", target, layout="eagle")
