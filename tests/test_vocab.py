"""vLLM speculators checkpoints (DSpark, DFlash, EAGLE3) with a reduced draft
vocabulary: recognised from config.json, loaded by load_drafter and
mlx_lm.load, drafts mapped back to target ids through ``d2t``, exact."""

import json
import shutil

import mlx.core as mx
import mlx_lm
import pytest

from conftest import EAGLE3_FIXTURES, plain_tokens
from mlx_lm_dspark import last_stats, load_drafter
from mlx_lm_dspark.config import DrafterConfigError, is_drafter_config
from mlx_lm_dspark.registry import kind_for
from mlx_lm_dspark.speculative import speculative_generate_step
from mlx_lm_dspark_tools.tiny import build_eagle3_pair, build_pair, to_speculators

PROMPT = [(7 * i + 3) % 300 + 5 for i in range(19)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(target dir, {name: speculators drafter dir}) for one tiny Qwen3 target."""
    root = tmp_path_factory.mktemp("speculators")
    target, dspark = build_pair(root / "dspark", "qwen3", num_layers=8)
    _, dflash = build_pair(root / "dflash", "qwen3", num_layers=8, markov_rank=0)
    _, eagle3 = build_eagle3_pair(root / "eagle3", "qwen3", num_layers=8)
    out = {}
    for name, source in (("dspark", dspark), ("dflash", dflash), ("eagle3", eagle3)):
        for vocab in (None, 300):
            out[f"{name}-{vocab or 'full'}"] = root / f"spec_{name}_{vocab}"
            to_speculators(source, out[f"{name}-{vocab or 'full'}"], draft_vocab_size=vocab)
    # Every speculators drafter above was built for its own target copy; all
    # targets are the same seeded model.
    return target, out


@pytest.fixture(scope="module")
def target_model(checkpoints):
    return mlx_lm.load(str(checkpoints[0]))[0]


NAMES = [f"{k}-{v}" for k in ("dspark", "dflash", "eagle3") for v in ("full", 300)]


@pytest.mark.parametrize("name", NAMES)
def test_speculators_checkpoints_load_and_decode_exactly(checkpoints, target_model, name):
    _, dirs = checkpoints
    config = json.loads((dirs[name] / "config.json").read_text())
    assert is_drafter_config(config) and kind_for(config).name == name.split("-")[0]
    drafter = load_drafter(dirs[name], bits=None)
    reduced = name.endswith("300")
    assert (drafter.vocab is not None) == reduced
    if name.startswith("dflash"):  # speculators' DFlash samples from the mask slots only (z-lab's alignment)
        assert drafter.args.shifted_alignment and drafter.max_drafts == drafter.args.block_size - 1
    expected = plain_tokens(target_model, PROMPT, 40)
    for cap in (None, 3):
        got = [t for t, _, _ in speculative_generate_step(mx.array(PROMPT), target_model, drafter,
                                                           max_tokens=40, num_draft_tokens=cap)]
        assert got == expected
    via_mlx_lm, _ = mlx_lm.load(str(dirs[name]))
    assert type(via_mlx_lm) is type(drafter) and via_mlx_lm.kind == drafter.kind


def test_speculators_taps_are_the_inputs_of_the_layers_named(checkpoints):
    _, dirs = checkpoints
    config = json.loads((dirs["eagle3-300"] / "config.json").read_text())
    drafter = load_drafter(dirs["eagle3-300"], bits=None)
    assert drafter.target_layer_ids == [i - 1 for i in config["eagle_aux_hidden_state_layer_ids"]]


@pytest.mark.parametrize("name", ["dspark-300", "eagle3-300"])
def test_drafts_stay_inside_the_draft_vocabulary(checkpoints, target_model, name):
    _, dirs = checkpoints
    drafter = load_drafter(dirs[name], bits=None)
    kept = set(drafter.vocab.target_ids().tolist())
    assert len(kept) == 300
    speculative_generate_step  # the loop's own sampling is covered in test_speculative_sampling
    from mlx_lm.sample_utils import make_sampler

    mx.random.seed(0)
    gen = speculative_generate_step(mx.array(PROMPT), target_model, drafter, max_tokens=40,
                                    sampler=make_sampler(temp=1.0), num_draft_tokens=3)
    tokens = [t for t, _, _ in gen]
    assert len(tokens) == 40 and last_stats(drafter).rule == "p/q"
    cache = drafter.make_cache()
    from mlx_lm_dspark.speculative import bind

    target = bind(drafter, target_model)
    tcache = target.make_cache()
    prompt = mx.array(PROMPT, dtype=mx.uint32)
    _, features = target(prompt[None], tcache)
    drafter.add_context(cache, features, 0, prompt)
    q_rows = []

    def choose(k, row):
        q = mx.softmax(row, axis=-1)
        q_rows.append(q)
        return mx.random.categorical(row).reshape(1), q

    drafts, _, q = drafter.propose(cache, mx.array([7]), len(PROMPT), 3, choose)
    assert set(drafts.tolist()) <= kept
    outside = mx.array(sorted(set(range(drafter.args.vocab_size)) - kept))
    assert mx.all(q[:, outside] == 0).item() and mx.allclose(q.sum(axis=-1), mx.ones(3)).item()


def test_a_reduced_vocabulary_keeps_deepspecs_acceptance(tmp_path):
    """DeepSpec's bigram EAGLE3 drafter as a speculators checkpoint whose draft
    vocabulary holds every token of the run: the same proposals, acceptance
    lengths and output as the released layout (the mapping is right)."""
    from mlx_lm.utils import load_model

    run = EAGLE3_FIXTURES / "e2e_bigram"
    expected = mx.load(str(run / "expected_qwen3.safetensors"))
    rope_theta = json.loads((run / "target" / "config.json").read_text())["rope_parameters"]["rope_theta"]
    target = load_model(run / "target", model_config={"rope_theta": rope_theta})[0]
    output = expected["output_ids"].reshape(-1).tolist()
    proposals = [t for t in expected["proposals"].reshape(-1).tolist() if t >= 0]
    vocab = json.loads((run / "draft_qwen3" / "config.json").read_text())["vocab_size"]
    extra = [i for i in range(0, vocab, 7)]
    keep = sorted(set(output) | set(proposals) | set(extra))
    to_speculators(run / "draft_qwen3", tmp_path / "spec", draft_vocab_size=len(keep), keep=keep)
    drafter = load_drafter(tmp_path / "spec", bits=None)
    assert drafter.vocab is not None and drafter.vocab.draft_size < vocab
    prompt, max_new = expected["prompt"].reshape(-1).tolist(), int(expected["max_new_tokens"].item())
    gen = speculative_generate_step(mx.array(prompt), target, drafter, num_draft_tokens=drafter.max_drafts,
                                    max_tokens=max_new + drafter.max_drafts + 1)
    got = [t for t, _, _ in gen][:max_new]
    assert got == output[len(prompt):]
    rounds = expected["acceptance_lengths"].size
    stats = last_stats(drafter)
    assert [a + 1 for a in stats.accepted_lengths[:rounds]] == expected["acceptance_lengths"].tolist()
    # Without the tokens the run needs, drafts are rejected more often, never wrongly kept.
    missing = sorted(set(range(vocab)) - set(output[len(prompt) + 5:]))[:len(keep)]
    to_speculators(run / "draft_qwen3", tmp_path / "spec_missing", draft_vocab_size=len(missing), keep=missing)
    drafter = load_drafter(tmp_path / "spec_missing", bits=None)
    gen = speculative_generate_step(mx.array(prompt), target, drafter, num_draft_tokens=drafter.max_drafts,
                                    max_tokens=max_new)
    assert [t for t, _, _ in gen] == output[len(prompt):]
    assert last_stats(drafter).accepted < stats.accepted


def test_a_damaged_mapping_is_one_line(checkpoints, tmp_path):
    _, dirs = checkpoints
    bad = tmp_path / "bad"
    shutil.copytree(dirs["eagle3-300"], bad)
    weights = mx.load(str(bad / "model.safetensors"))
    weights["d2t"] = weights["d2t"] + 10_000
    mx.save_safetensors(str(bad / "model.safetensors"), weights)
    with pytest.raises(DrafterConfigError, match="d2t maps draft rows outside") as caught:
        load_drafter(bad, bits=None)
    assert "\n" not in str(caught.value)


def _speculators_config(checkpoints, name, **changes):
    _, dirs = checkpoints
    config = json.loads((dirs[name] / "config.json").read_text())
    config.update(changes)
    return config


def _write(tmp_path, config, source):
    out = tmp_path / "drafter"
    shutil.copytree(source, out)
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_speculators_layer_id_zero_is_the_embedding_tap(checkpoints):
    """speculators' aux id 0 (the embeddings entering layer 0) is tap -1."""
    from mlx_lm_dspark.config import speculators_args

    config = _speculators_config(checkpoints, "eagle3-300", eagle_aux_hidden_state_layer_ids=[0, 2, 3, 5, 6])
    assert speculators_args(config)["target_layer_ids"] == [-1, 1, 2, 4, 5]


@pytest.mark.parametrize("changes,message", [
    (dict(speculators_model_type="mtp"), "speculators checkpoint of type 'mtp'"),
    (dict(norm_output=True), "norm_output on"),
    (dict(eagle_aux_hidden_state_layer_ids=[-1, 2, 3, 5, 6]), "negative layer id"),
    (dict(transformer_layer_config={"model_type": "llama", "hidden_size": 64}), "'llama' transformer_layer_config"),
])
def test_speculators_variants_we_do_not_run_are_refused_in_one_line(checkpoints, tmp_path, changes, message):
    _, dirs = checkpoints
    bad = _write(tmp_path, _speculators_config(checkpoints, "eagle3-300", **changes), dirs["eagle3-300"])
    for load in (lambda: load_drafter(bad, bits=None), lambda: mlx_lm.load(str(bad))):
        with pytest.raises(DrafterConfigError, match=message) as caught:
            load()
        assert "\n" not in str(caught.value)
    if "mtp" in message:
        assert "recognises" in str(caught.value) and "Qwen3Eagle3Model" in str(caught.value)
