"""The drafter trainer: training forward = inference forward, frozen target
and embeddings, learning on a tiny target, reload, resume, CLI."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.cache import make_prompt_cache

from mlx_lm_dspark import train as T
from mlx_lm_dspark.loader import load_drafter
from mlx_lm_dspark.target import TargetAdapter
from mlx_lm_dspark_tools.tiny import make_gemma4_target, make_qwen3_target, save_target

TAPS = [1, 2]
CHAT_TEMPLATE = "{% for m in messages %}{{ m.role }} : {{ m.content }}\n{% endfor %}"


def small_args(**kw):
    base = dict(markov_rank=8, num_layers=1, target_layer_ids=TAPS, block_size=4, iters=4, batch_size=2,
                anchors_per_seq=4, seq_length=64, learning_rate=3e-3, eval_every=0, save_every=0,
                progress=False)
    base.update(kw)
    return T.TrainingArgs(**base)


def bigram_target():
    """A Qwen3 target whose layers add nothing: its greedy next token is a
    fixed function of the current one, a text a small drafter can learn."""
    model, config = make_qwen3_target(num_layers=4)
    silenced = [(k, v * 0) for k, v in tree_flatten(model.parameters())
                if k.endswith(("o_proj.weight", "down_proj.weight"))]
    model.update(tree_unflatten(silenced))
    mx.eval(model.parameters())
    return model, config


def greedy_corpus(model, n, length, seed):
    """n greedy continuations of random 2-token prompts (batched)."""
    tokens = mx.array(np.random.default_rng(seed).integers(3, 500, (n, 2)).astype(np.int32))
    cache = make_prompt_cache(model)
    out, logits = [tokens], model(tokens, cache=cache)
    for _ in range(length - 2):
        nxt = mx.argmax(logits[:, -1:], axis=-1).astype(mx.int32)
        out.append(nxt)
        logits = model(nxt, cache=cache)
    return np.array(mx.concatenate(out, axis=1)).tolist()


@pytest.fixture(scope="module")
def bigram():
    model, config = bigram_target()
    return model, config, greedy_corpus(model, 48, 32, seed=0)


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory, bigram):
    """The bigram target on disk, with a chat template added to its tokenizer."""
    path = tmp_path_factory.mktemp("target")
    model, config, _ = bigram
    save_target(path, model, config)
    tc = path / "tokenizer_config.json"
    tc.write_text(json.dumps({**json.loads(tc.read_text()), "chat_template": CHAT_TEMPLATE}))
    return path


def params(module):
    return dict(tree_flatten(module.parameters()))


# ---------------------------------------------------------------- 1. parity


@pytest.mark.parametrize("family", ["qwen3", "gemma4", "qwen3-causal-sliding"])
@pytest.mark.parametrize("rank", [8, 0])
def test_training_forward_matches_inference(family, rank):
    make = make_gemma4_target if family == "gemma4" else make_qwen3_target
    family, layers = family.split("-")[0], family.endswith("sliding")
    model, config = make(seed=1)  # Gemma-4: sliding, full and KV-shared layers
    args = small_args(markov_rank=rank, num_layers=2, block_size=5, target_layer_ids=[1, 3, 5])
    config = T.drafter_config(config, family, len(model.layers), args, 500)
    if layers:  # z-lab's drafter layers: sliding (window 9), causal inside the block
        config.update(layer_types=["sliding_attention", "full_attention"], sliding_window=9,
                      causal_layer_types=["sliding_attention"])
    drafter = T.build_drafter(config, model, seed=2)
    if rank:  # a non-zero Markov head, so the correction is exercised
        w2 = drafter.markov_head.markov_w2
        w2.weight = 0.3 * mx.random.normal(w2.weight.shape, key=mx.random.key(3))
    target = TargetAdapter(model, drafter.target_layer_ids)
    tokens = mx.array(np.random.default_rng(4).integers(3, 500, (1, 24)).astype(np.int32))
    _, features = target(tokens, None)

    anchors = [1, 7, 13, 19]
    rounds = []
    for a in anchors:  # inference: context = positions < a, block at a
        cache = drafter.make_cache()
        drafter.add_context(cache, features[:, :a], 0)
        rounds.append(drafter.draft_block(cache, tokens[0, a], a))

    # Several blocks of one sequence in one pass see exactly what each round sees.
    out = T.block_forward(drafter, features, tokens, mx.array([anchors], dtype=mx.int32))
    for j, r in enumerate(rounds):
        assert mx.allclose(out["hidden"][0, j], r["hidden"][0], atol=1e-5)
        assert mx.allclose(out["base_logits"][0, j], r["base_logits"][0], atol=1e-4)

    # Teacher forcing on the drafted tokens reproduces the Markov chain and confidences.
    for j, (a, r) in enumerate(zip(anchors, rounds)):
        forced = np.array(tokens)
        drafts = np.array(r["tokens"])
        forced[0, a + 1 : a + 5] = drafts[:4]
        out = T.block_forward(drafter, features, mx.array(forced), mx.array([[a]], dtype=mx.int32))
        assert mx.allclose(out["corrected_logits"][0, 0], r["corrected_logits"], atol=1e-4)
        if rank:
            assert mx.allclose(out["confidence_logits"][0, 0], r["confidence_logits"], atol=1e-4)
        else:
            assert out["confidence_logits"] is None and r["confidence_logits"] is None


def test_block_mask_layout():
    mask = np.array(T.block_mask(mx.array([[2, 5]]), 6, 3))[0, 0]
    assert mask.shape == (6, 6 + 6)
    assert mask[:3, :6].tolist() == [[True, True, False, False, False, False]] * 3
    assert mask[3:, :6].tolist() == [[True] * 5 + [False]] * 3
    assert mask[:3, 6:].tolist() == [[True] * 3 + [False] * 3] * 3
    assert mask[3:, 6:].tolist() == [[False] * 3 + [True] * 3] * 3


# ---------------------------------------------------------------- 2. gradients


def test_gradients_reach_only_drafter_weights(bigram, tmp_path):
    model, config, corpus = bigram
    args = small_args(iters=1)
    drafter = T.build_drafter(T.drafter_config(config, "qwen3", 4, args, 500), model, seed=0)
    target = TargetAdapter(model, drafter.target_layer_ids)
    loss, grads = T.make_loss_and_grad(drafter, target, args)(*T.micro_batch(corpus, 0, args, 0))
    names = set(dict(tree_flatten(grads)))
    assert names == set(dict(tree_flatten(drafter.trainable_parameters())))
    assert not any(n.startswith(("embed_tokens", "lm_head")) for n in names)
    assert {"fc.weight", "markov_head.markov_w2.weight", "confidence_head.proj.weight"} <= names
    assert all(mx.all(mx.isfinite(g)).item() for g in dict(tree_flatten(grads)).values())
    assert mx.abs(dict(tree_flatten(grads))["fc.weight"]).sum().item() > 0

    before = {k: np.array(v) for k, v in params(model).items()}
    out = T.train(model, corpus, args, output=tmp_path / "d")
    after = params(model)
    assert all(np.array_equal(before[k], np.array(after[k])) for k in before)
    saved = mx.load(str(out / "model.safetensors"))
    assert mx.array_equal(saved["embed_tokens.weight"], model.model.embed_tokens.weight)
    assert mx.array_equal(saved["lm_head.weight"], model.lm_head.weight)
    assert not mx.array_equal(saved["fc.weight"], drafter.fc.weight)  # the drafter did move


# ---------------------------------------------------------------- 3. learning


# Over data seeds 0-3 these settings gave (block / ttt_length 4: τ at most 5)
# DSpark τ 1.07-1.19 -> 2.5-4.6 with a loss ratio of about 0.5, EAGLE3 τ
# 1.0 -> 2.8-3.7 with about 0.45; the bounds leave a wide margin.
SHORT_RUNS = {
    # algorithm: (its settings, loss ratio, held-out loss ratio, τ gain) bounds
    "dspark": (lambda: small_args(iters=60, batch_size=4, anchors_per_seq=8, learning_rate=1e-2, eval_every=60,
                                  eval_sequences=4, eval_tokens=24), 0.75, 0.8, 0.8),
    "eagle3": (lambda: eagle3_args(block_size=4, iters=60, batch_size=4, learning_rate=1e-2, eval_every=60,
                                   eval_sequences=4, eval_tokens=24), 0.6, 0.6, 1.2),
}


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", SHORT_RUNS)
def test_short_run_lowers_loss_and_raises_tau(bigram, tmp_path, algorithm):
    model, _, corpus = bigram
    settings, loss_ratio, val_ratio, tau_gain = SHORT_RUNS[algorithm]
    out = T.train(model, corpus, settings(), output=tmp_path / "d")
    history = json.loads((out / "trainer_state.json").read_text())["history"]
    evals = [h for h in history if "tau" in h]
    losses = [h["loss"] for h in history if "loss" in h]
    assert [e["step"] for e in evals] == [0, 60]
    assert np.mean(losses[-5:]) < loss_ratio * np.mean(losses[:5])
    assert evals[1]["val_loss"] < val_ratio * evals[0]["val_loss"]
    assert evals[1]["tau"] > evals[0]["tau"] + tau_gain, evals


# ---------------------------------------------------------------- 4. reload


def test_saved_drafter_reloads_bit_exactly(bigram, tmp_path):
    model, config, corpus = bigram
    args = small_args()
    drafter = T.build_drafter(T.drafter_config(config, "qwen3", 4, args, 500), model, seed=5)
    drafter.markov_head.markov_w2.weight = mx.random.normal(drafter.markov_head.markov_w2.weight.shape)
    T.save_drafter(drafter, T.drafter_config(config, "qwen3", 4, args, 500), tmp_path)
    loaded = load_drafter(tmp_path, bits=None)
    assert loaded.kind == "dspark"
    mine, theirs = params(drafter), params(loaded)
    assert mine.keys() == theirs.keys()
    assert all(mx.array_equal(mine[k], theirs[k]) for k in mine)

    tokens = mx.array([corpus[0]], dtype=mx.int32)
    _, features = TargetAdapter(model, TAPS)(tokens, None)
    proposals = []
    for d in (drafter, loaded):
        cache = d.make_cache()
        d.add_context(cache, features[:, :10], 0)
        proposals.append(d.propose(cache, tokens[0, 10], 10, 4))
    assert mx.array_equal(proposals[0][0], proposals[1][0])
    assert mx.array_equal(proposals[0][1], proposals[1][1])


# ---------------------------------------------------------------- 5. resume


@pytest.mark.parametrize("algorithm", ["dspark", "eagle3"])
def test_resume_matches_uninterrupted_run(bigram, tmp_path, monkeypatch, algorithm):
    model, _, corpus = bigram
    args = small_args(iters=6, save_every=3, grad_accumulation=2, algorithm=algorithm)
    straight = T.train(model, corpus, args, output=tmp_path / "straight")

    real = T.micro_batch

    def crash_after_step_3(train, index, a, pad):
        if index >= 4 * a.grad_accumulation:
            raise KeyboardInterrupt
        return real(train, index, a, pad)

    monkeypatch.setattr(T, "micro_batch", crash_after_step_3)
    with pytest.raises(KeyboardInterrupt):
        T.train(model, corpus, args, output=tmp_path / "resumed")
    monkeypatch.setattr(T, "micro_batch", real)
    assert json.loads((tmp_path / "resumed" / "trainer_state.json").read_text())["step"] == 3
    T.train(model, corpus, T.TrainingArgs(**{**vars(args), "resume": True}), output=tmp_path / "resumed")

    a = mx.load(str(straight / "model.safetensors"))
    b = mx.load(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(mx.array_equal(a[k], b[k]) for k in a)
    opt_a = mx.load(str(straight / "optimizer.safetensors"))
    opt_b = mx.load(str(tmp_path / "resumed" / "optimizer.safetensors"))
    assert all(mx.array_equal(opt_a[k], opt_b[k]) for k in opt_a)


# ---------------------------------------------------------------- 6. CLI and errors


def test_cli_smoke(target_dir, tmp_path, bigram):
    data = tmp_path / "data.jsonl"
    lines = [{"messages": [{"role": "user", "content": "the quick brown fox"},
                           {"role": "assistant", "content": "jumps over the lazy dog " * 3}]},
             {"turns": ["what is the time", "it is about ten"]},
             {"text": "the cat sat on the mat and the dog ran to the park"}] * 4
    data.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = T.run(["--model", str(target_dir), "--data", str(data), "--output", str(tmp_path / "d"),
                  "--iters", "2", "--num-layers", "1", "--block-size", "4", "--markov-rank", "8",
                  "--batch-size", "2", "--anchors-per-seq", "3", "--target-layer-ids", "1", "2",
                  "--eval-every", "0", "--quiet"])
    drafter = load_drafter(out, bits=None)
    assert drafter.args.block_size == 4 and drafter.target_layer_ids == [1, 2]
    assert drafter.args.markov_rank == 8 and drafter.args.num_target_layers == 4
    assert json.loads((out / "trainer_state.json").read_text())["step"] == 2


def test_default_layer_ids_follow_released_drafters():
    assert T.default_layer_ids(36) == [1, 9, 17, 25, 33]
    assert T.default_layer_ids(40) == [1, 10, 19, 28, 37]
    assert T.default_layer_ids(8, 3) == [1, 3, 5]


def test_chat_and_text_rendering(target_dir):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    tok = load_tokenizer(target_dir)
    chat = T.render({"turns": ["the dog", "a cat"]}, tok)
    assert chat == tok.encode("user : the dog\nassistant : a cat\n", add_special_tokens=False)
    assert T.render({"text": "the dog"}, tok) == tok.encode("the dog")
    assert T.render([5, 6, 7], None) == [5, 6, 7]
    # Long sequences are split; pieces too short to train (< 3 tokens) dropped.
    assert T.tokenize_data([list(range(3, 14))], None, 4) == [[3, 4, 5, 6], [7, 8, 9, 10], [11, 12, 13]]
    assert T.tokenize_data([list(range(3, 13))], None, 4) == [[3, 4, 5, 6], [7, 8, 9, 10]]


def run_cli_error(capsys, argv):
    with pytest.raises(SystemExit) as e:
        T.main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_cli_bad_input(target_dir, tmp_path, capsys):
    base = ["--model", str(target_dir), "--output", str(tmp_path / "d"), "--quiet"]
    err = run_cli_error(capsys, base + ["--data", str(tmp_path / "missing.jsonl")])
    assert "no such file" in err and ".jsonl or .txt" in err

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert "No training sequences" in run_cli_error(capsys, base + ["--data", str(empty)])

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    assert "has none of 'turns', 'messages'" in run_cli_error(capsys, base + ["--data", str(bad)])

    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n")
    assert "--iters must be positive" in run_cli_error(capsys, base + ["--data", str(text), "--iters", "0"])
    assert "unrecognized arguments" in run_cli_error(capsys, base + ["--data", str(text), "--lr", "1"])
    err = run_cli_error(capsys, base + ["--data", str(text), "--target-layer-ids", "9"])
    assert "out of range for a 4-layer target" in err
    assert "no checkpoint" in run_cli_error(capsys, base + ["--data", str(text), "--resume"])
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / T.STATE_FILE).write_text('{"step": 3,')  # a checkpoint cut short
    assert "checkpoint in" in run_cli_error(capsys, base + ["--data", str(text), "--resume"])
    assert "Cannot load the target" in run_cli_error(
        capsys, ["--model", str(tmp_path / "nowhere"), "--data", str(text), "--quiet"])


def test_a_target_without_tappable_layers_is_refused(tmp_path):
    import mlx.nn as nn

    class NoLayers(nn.Module):
        args = {"model_type": "mystery", "vocab_size": 64, "hidden_size": 32}

        def __call__(self, tokens, cache=None):
            return tokens

    with pytest.raises(T.TrainingError, match="exposes no `layers`"):
        T.train(NoLayers(), [[1, 2, 3, 4]], small_args(), output=tmp_path)


@pytest.mark.parametrize("family,bits", [("gemma4", None), ("qwen3", 4)])
def test_trains_gemma4_and_quantized_targets(family, bits, tmp_path):
    make = make_qwen3_target if family == "qwen3" else make_gemma4_target
    model, _ = make(bits=bits)
    corpus = np.random.default_rng(0).integers(3, 500, (20, 16)).tolist()
    args = small_args(iters=2, target_layer_ids=None, eval_every=2, eval_sequences=2, eval_tokens=6)
    out = T.train(model, corpus, args, output=tmp_path)
    history = json.loads((out / "trainer_state.json").read_text())["history"]
    assert [h["step"] for h in history if "tau" in h] == [0, 2]
    assert all(np.isfinite(h.get("loss", h.get("val_loss"))) for h in history)
    drafter = load_drafter(out, bits=None)
    assert drafter.args.family == family and drafter.target_layer_ids == T.default_layer_ids(8)
    inner = getattr(model, "language_model", model)
    embed, head = T.target_embeddings(model)
    assert mx.array_equal(drafter.embed_tokens.weight, embed)
    assert mx.array_equal(drafter.lm_head.weight, head)
    if bits:  # the dequantized copy of the packed target matrices
        e = inner.model.embed_tokens
        assert mx.allclose(embed, mx.dequantize(e.weight, e.scales, e.biases, e.group_size, e.bits), atol=0)


def test_blas_hint(monkeypatch):
    """Linux CPU wheels of mlx bundle the reference BLAS: the CLI says how to
    preload OpenBLAS, and stays quiet when it is preloaded or not on Linux."""
    import sys
    from pathlib import Path

    from mlx_lm_dspark.train import blas_hint

    bundled = list((Path(mx.__file__).resolve().parents[1] / "mlx_cpu.libs").glob("libblas*"))
    monkeypatch.setenv("LD_PRELOAD", "")
    hint = blas_hint()
    if sys.platform == "linux" and bundled:
        assert "reference BLAS" in hint and "LD_PRELOAD" in hint
    else:
        assert hint is None
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libopenblas.so.0")
    assert blas_hint() is None
    monkeypatch.setenv("LD_PRELOAD", "")
    monkeypatch.setattr(sys, "platform", "darwin")
    assert blas_hint() is None


# ---------------------------------------------------------------- 7. EAGLE3


def eagle3_args(**kw):
    return small_args(**{"algorithm": "eagle3", "block_size": 3, "target_layer_ids": [0, 1, 2], **kw})


@pytest.mark.parametrize("family", ["qwen3", "gemma4"])
def test_eagle3_training_forward_is_the_drafting_chain(family):
    """Unrolled step k at row s-1 is what inference computes for draft k+1
    after anchor s, when every earlier draft was the true token."""
    make = make_qwen3_target if family == "qwen3" else make_gemma4_target
    model, config = make(seed=1)
    args = eagle3_args(block_size=4, target_layer_ids=[1, 3, 5])
    drafter = T.build_drafter(T.drafter_config(config, family, len(model.layers), args, None), model, seed=2)
    assert drafter.kind == "eagle3" and drafter.max_drafts == 4
    tokens = mx.array(np.random.default_rng(4).integers(3, 500, (1, 24)).astype(np.int32))
    _, features = TargetAdapter(model, drafter.target_layer_ids)(tokens, None)
    outputs = drafter.ttt_forward(features, T.ttt_inputs(tokens, 4))
    for s in (1, 9, 19):
        cache = drafter.make_cache()
        drafter.add_context(cache, features[:, :s], 0, tokens[0, :s])
        forced = lambda j, row, s=s: (tokens[0, s + 1 + j : s + 2 + j], mx.softmax(row, axis=-1))
        chain = drafter.draft(cache, tokens[0, s], s, 4, forced)["hidden"]
        for k in range(4):
            assert mx.allclose(outputs[k][0, s - 1], chain[0, k], atol=1e-4).item(), (s, k)


@pytest.mark.parametrize("family", ["qwen3", "gemma4"])
def test_eagle3_gradients_reach_only_its_trained_weights(family):
    make = make_qwen3_target if family == "qwen3" else make_gemma4_target
    model, config = make()
    args = eagle3_args(target_layer_ids=[1, 3, 5])
    drafter = T.build_drafter(T.drafter_config(config, family, len(model.layers), args, None), model, seed=0)
    corpus = np.random.default_rng(0).integers(3, 500, (4, 12)).tolist()
    target = TargetAdapter(model, drafter.target_layer_ids)
    loss, grads = T.make_loss_and_grad(drafter, target, args)(*T.micro_batch(corpus, 0, args, 0))
    grads = dict(tree_flatten(grads))
    assert set(grads) == set(dict(tree_flatten(drafter.trainable_parameters())))
    frozen = {"embed_tokens.weight", "lm_head.weight", "layers.0.layer_scalar"}
    assert not frozen & set(grads) and {"fc.weight", "norm.weight", "layers.0.self_attn.q_proj.weight"} <= set(grads)
    assert np.isfinite(loss.item()) and all(mx.abs(g).sum().item() > 0 for g in grads.values())


RELEASED_EAGLE3_QWEN3 = {
    "embed_tokens.weight", "fc.weight", "norm.weight", "lm_head.weight",
    *(f"layers.0.{n}.weight" for n in (
        "hidden_norm", "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
        "self_attn.v_proj", "self_attn.o_proj", "self_attn.q_norm", "self_attn.k_norm", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")),
}


def test_eagle3_cli_run_gives_a_loadable_exact_drafter(bigram, tmp_path):
    """``--algorithm eagle3``: DeepSpec's released layout, loaded by
    load_drafter, and greedy speculative output equal to plain decoding."""
    from mlx_lm.generate import generate_step

    from mlx_lm_dspark.speculative import speculative_generate_step

    model, config, corpus = bigram
    target_dir = tmp_path / "target"
    save_target(target_dir, model, config)
    data = tmp_path / "ids.jsonl"
    data.write_text("".join(json.dumps(seq) + "\n" for seq in corpus))
    out = T.run(["--algorithm", "eagle3", "--model", str(target_dir), "--data", str(data),
                 "--output", str(tmp_path / "d"), "--iters", "3", "--block-size", "3", "--batch-size", "2",
                 "--target-layer-ids", "0", "1", "2", "--eval-every", "0", "--quiet"])
    saved = mx.load(str(out / "model.safetensors"))
    assert set(saved) == RELEASED_EAGLE3_QWEN3
    assert mx.array_equal(saved["embed_tokens.weight"], model.model.embed_tokens.weight)
    assert mx.array_equal(saved["lm_head.weight"], model.lm_head.weight)
    written = json.loads((out / "config.json").read_text())
    assert written["architectures"] == ["Qwen3Eagle3Model"] and written["model_type"] == "qwen3"
    assert (written["ttt_length"], written["step_loss_decay"], written["num_target_layers"]) == (3, 0.8, 4)
    assert "mask_token_id" not in written and "block_size" not in written
    assert json.loads((out / "trainer_state.json").read_text())["step"] == 3

    drafter = load_drafter(out, bits=None)
    assert drafter.kind == "eagle3" and drafter.max_drafts == 3 and drafter.target_layer_ids == [0, 1, 2]
    prompt = mx.array(corpus[0][:6], dtype=mx.uint32)
    plain = [t for t, _ in generate_step(prompt, model, max_tokens=20)]
    spec = [t for t, _, _ in speculative_generate_step(prompt, model, drafter, num_draft_tokens=3, max_tokens=20)]
    assert spec == plain


def test_eagle3_loss_goes_down(bigram, tmp_path):
    model, _, corpus = bigram
    args = eagle3_args(iters=12, batch_size=4, learning_rate=1e-2)
    out = T.train(model, corpus, args, output=tmp_path / "d")
    losses = [h["loss"] for h in json.loads((out / "trainer_state.json").read_text())["history"]]
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


def test_eagle3_options_are_checked(bigram, tmp_path):
    model, _, corpus = bigram
    with pytest.raises(T.TrainingError, match="exactly one layer"):
        eagle3_args(num_layers=2).check()
    with pytest.raises(T.TrainingError, match="choose one of dspark, dflash, eagle3"):
        T.TrainingArgs(algorithm="medusa")
    assert T.TrainingArgs(algorithm="dflash", markov_rank=8).markov_rank == 0
    assert (T.TrainingArgs().weight_decay, T.TrainingArgs(algorithm="eagle3").weight_decay) == (0.01, 0.0)
    T.train(model, corpus, small_args(iters=1), output=tmp_path)
    with pytest.raises(T.TrainingError, match="is a dspark drafter, not eagle3"):
        T.train(model, corpus, eagle3_args(iters=2, resume=True), output=tmp_path)
