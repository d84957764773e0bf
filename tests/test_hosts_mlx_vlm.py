"""Our drafters inside mlx-vlm's Gemma-4 path: registered draft kind,
exact greedy output (text and image prompts, python API, CLI and server),
mlx-vlm's native drafters untouched, and the hook failing loudly on a
changed host."""

import contextlib
import importlib
import io
import json
import os
import socket
import subprocess
import sys
import time
import types
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("mlx_vlm", reason="the mlx-vlm integration needs the `vlm` extra (pip install '.[vlm]')")

from mlx_lm_dspark import last_stats  # noqa: E402
from mlx_lm_dspark.hosts import mlx_vlm as patch_mlx_vlm  # noqa: E402
from mlx_lm_dspark.drafter import Drafter  # noqa: E402
from mlx_lm_dspark.hosts.mlx_lm import HostMismatchError  # noqa: E402
from mlx_lm_dspark_tools.serve_benchmark import stop  # noqa: E402
from mlx_lm_dspark_tools.tiny_vlm import build_vlm_pair, make_image  # noqa: E402

TEXT = "the quick brown fox jumps over the lazy dog and then"
LONG = " ".join(["a story about a small red house near the river"] * 4)
PICTURE = "describe this picture in a few words"
MAX_TOKENS = 40  # well past the sliding window of 8: the rotating caches wrap


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    out = {kind: build_vlm_pair(root, kind) for kind in ("random", "copy", "k_eq_v", "eagle3")}
    out["image"] = make_image(root / "image.png")
    return out


@pytest.fixture(scope="module")
def loaded(pairs):
    from mlx_vlm import load

    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = load(str(pairs[kind][0]))
        return cache[kind]

    return get


def generate_ids(model, processor, prompt, image=None, max_tokens=MAX_TOKENS, **kwargs):
    from mlx_vlm import stream_generate
    from mlx_vlm.prompt_utils import apply_chat_template

    formatted = apply_chat_template(processor, model.config, prompt, num_images=0 if image is None else 1)
    last = None
    for last in stream_generate(model, processor, formatted, image=[image] if image else None,
                                max_tokens=max_tokens, temperature=0.0, **kwargs):
        pass
    return list(last.token_ids)


def test_our_kind_is_registered_and_loads_our_drafter(pairs):
    from mlx_vlm.speculative.drafters import KNOWN_DRAFTER_KINDS, load_drafter

    assert patch_mlx_vlm.KIND in KNOWN_DRAFTER_KINDS
    drafter, kind = load_drafter(str(pairs["random"][1]), kind=patch_mlx_vlm.KIND)
    assert isinstance(drafter, Drafter) and kind == "dflash"  # mlx-vlm's prefill plumbing for it
    assert drafter.config.target_layer_ids == [1, 2, 3]


@pytest.mark.parametrize("kind", ["random", "copy"])
@pytest.mark.parametrize("prompt", ["text", "long", "image"])
@pytest.mark.parametrize("block", [None, 8, 3])
def test_greedy_output_equals_plain_decoding(pairs, loaded, kind, prompt, block):
    from mlx_vlm.speculative.drafters import load_drafter

    model, processor = loaded(kind)
    text, image = {"text": (TEXT, None), "long": (LONG, None), "image": (PICTURE, pairs["image"])}[prompt]
    plain = generate_ids(model, processor, text, image)
    drafter, host_kind = load_drafter(str(pairs[kind][1]), kind=patch_mlx_vlm.KIND)
    extra = {} if block is None else {"draft_block_size": block}
    spec = generate_ids(model, processor, text, image, draft_model=drafter, draft_kind=host_kind, **extra)
    assert spec == plain
    stats = last_stats(drafter)
    assert 1 + stats.rounds + sum(stats.accepted_lengths) == len(plain)  # prefill token + rounds
    if block is not None:
        assert max(stats.proposal_lengths) == block - 1  # --draft-block-size counts the anchor
        if kind == "copy":
            assert stats.accepted > 0 and stats.accepted < stats.drafted  # accepts and rejections


@pytest.mark.parametrize("prompt", ["text", "long", "image"])
def test_an_eagle3_drafter_runs_through_our_kind(pairs, loaded, prompt, monkeypatch):
    """EAGLE3 pairs each prompt state with the token after it: the round loop
    gets the prefilled token ids with the captured states (mlx-vlm passes
    only the last one after a chunked prefill)."""
    from mlx_lm_dspark.eagle3 import Eagle3Drafter
    from mlx_vlm.speculative.drafters import load_drafter

    model, processor = loaded("eagle3")
    text, image = {"text": (TEXT, None), "long": (LONG, None), "image": (PICTURE, pairs["image"])}[prompt]
    plain = generate_ids(model, processor, text, image)
    drafter, host_kind = load_drafter(str(pairs["eagle3"][1]), kind=patch_mlx_vlm.KIND)
    assert isinstance(drafter, Eagle3Drafter)
    seen = []
    add_context = drafter.add_context

    def recording(cache, features, start, tokens=None):
        seen.append((features.shape[1], None if tokens is None else tokens.tolist()))
        return add_context(cache, features, start, tokens)

    monkeypatch.setattr(drafter, "add_context", recording)
    spec = generate_ids(model, processor, text, image, draft_model=drafter, draft_kind=host_kind,
                        draft_block_size=4)
    assert spec == plain
    stats = last_stats(drafter)
    assert stats.rounds > 0 and max(stats.proposal_lengths) == 3
    prompt_rows, prompt_ids = seen[0]  # the prompt: every position, with its token id
    assert prompt_ids is not None and len(prompt_ids) == prompt_rows > 1
    assert all(isinstance(t, int) and 0 <= t < 512 for t in prompt_ids)


def test_eos_inside_an_accepted_block_stops_like_plain(pairs, loaded):
    from mlx_vlm.speculative.drafters import load_drafter

    model, processor = loaded("copy")
    plain = generate_ids(model, processor, TEXT, max_tokens=60)
    # Stop on the second token of a run (what the copy drafter gets right),
    # as an end-of-sequence token there would: counted per yielded token.
    stop = next(i for i in range(4, len(plain)) if plain[i] == plain[i - 1])
    tokenizer = processor.tokenizer
    old = tokenizer.stopping_criteria

    def stop_at(index):
        seen = []
        return lambda token: seen.append(token) or len(seen) == index + 1

    try:
        tokenizer.stopping_criteria = stop_at(stop)
        plain_stop = generate_ids(model, processor, TEXT, max_tokens=60)
        drafter, host_kind = load_drafter(str(pairs["copy"][1]), kind=patch_mlx_vlm.KIND)
        tokenizer.stopping_criteria = stop_at(stop)
        spec_stop = generate_ids(model, processor, TEXT, max_tokens=60, draft_model=drafter,
                                 draft_kind=host_kind, draft_block_size=8)
    finally:
        tokenizer.stopping_criteria = old
    assert plain_stop == plain[: stop + 1]
    assert last_stats(drafter).accepted_lengths[-1] >= 1  # it stopped on an accepted draft, mid-block
    assert spec_stop == plain_stop


def test_native_drafters_are_untouched(pairs, loaded):
    from mlx_vlm.speculative.drafters import load_drafter

    drafter, kind = load_drafter(str(pairs["copy"][1]))  # no kind: mlx-vlm's own Gemma-4 DSpark
    assert not isinstance(drafter, Drafter) and kind == "dflash"
    model, processor = loaded("copy")
    plain = generate_ids(model, processor, TEXT)
    assert generate_ids(model, processor, TEXT, draft_model=drafter, draft_kind=kind) == plain
    assert drafter.accept_lens  # mlx-vlm's own loop ran


def test_checkpoints_mlx_vlm_cannot_run_come_to_us(pairs, loaded):
    from mlx_vlm.speculative.drafters import load_drafter

    # mlx-vlm 0.7.10's Gemma-4 DSpark loop reads v_proj, absent with attention_k_eq_v.
    drafter, kind = load_drafter(str(pairs["k_eq_v"][1]))
    assert isinstance(drafter, Drafter)
    model, processor = loaded("k_eq_v")
    plain = generate_ids(model, processor, TEXT)
    assert generate_ids(model, processor, TEXT, draft_model=drafter, draft_kind=kind, draft_block_size=8) == plain


def test_a_drafter_loaded_by_us_runs_in_mlx_vlm(pairs, loaded):
    from mlx_lm_dspark import load_drafter

    drafter = load_drafter(str(pairs["copy"][1]), bits=None)
    assert not hasattr(drafter, "config")  # the network class carries no mlx-vlm plumbing
    model, processor = loaded("copy")
    plain = generate_ids(model, processor, TEXT)
    assert generate_ids(model, processor, TEXT, draft_model=drafter, draft_kind="dflash", draft_block_size=8) == plain
    assert isinstance(drafter, Drafter) and drafter.config.target_layer_ids == drafter.target_layer_ids
    assert drafter.accept_lens == last_stats(drafter).accepted_lengths and drafter.draft_lens


def test_mismatched_target_is_refused(pairs, loaded):
    from mlx_vlm.speculative.drafters import load_drafter

    from mlx_lm_dspark.session import forget
    from mlx_lm_dspark.target import DrafterMismatchError

    model, processor = loaded("random")
    drafter, kind = load_drafter(str(pairs["random"][1]), kind=patch_mlx_vlm.KIND)
    drafter.args.hidden_size = 128  # as if trained for another target
    try:
        forget(drafter, model)
        with pytest.raises(DrafterMismatchError, match="hidden_size"):
            generate_ids(model, processor, TEXT, draft_model=drafter, draft_kind=kind)
    finally:
        drafter.args.hidden_size = 64


def run_cli(argv):
    dispatch = importlib.import_module("mlx_vlm.generate.dispatch")
    out = io.StringIO()
    old = sys.argv
    sys.argv = ["mlx_vlm.generate", *argv]
    try:
        with contextlib.redirect_stdout(out):
            dispatch.main()
    finally:
        sys.argv = old
    return out.getvalue()


def generated_text(output: str) -> str:
    """The generated text among the CLI's lines (drafter loading and stats lines aside)."""
    lines = [line for line in output.splitlines()
             if line.strip() and not line.startswith(("Loading drafter", "Speculative decoding", " "))]
    assert len(lines) == 1, output
    return lines[0]


def test_cli_with_our_draft_kind(pairs):
    target, drafter = pairs["copy"]
    common = ["--model", str(target), "--prompt", PICTURE, "--image", pairs["image"],
              "--max-tokens", "30", "--temperature", "0"]
    plain = run_cli(common)
    ours = run_cli(common + ["--draft-model", str(drafter), "--draft-kind", patch_mlx_vlm.KIND])
    assert generated_text(ours) == generated_text(plain) and generated_text(plain)
    assert "instead of" not in ours  # the kind the user chose is not reported as overridden
    assert "Speculative decoding:" in ours  # mlx-vlm's own stats line, from our drafter's counts
    with pytest.raises(SystemExit):
        run_cli(common + ["--draft-kind", "no-such-kind"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def vlm_server(target, *extra, log=None):
    port = _free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_vlm.server", "--model", str(target), "--host", "127.0.0.1",
         "--port", str(port), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError("mlx_vlm.server exited:\n" + proc.stdout.read())
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError("mlx_vlm.server did not come up in 120 s")
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc, timeout=20)
        if log is not None:
            log.append(proc.stdout.read())


def chat(url, model, content, max_tokens=30):
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0}
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())["choices"][0]["message"]["content"]


@pytest.mark.slow
def test_server_with_our_draft_kind(pairs):
    import base64

    target, drafter = pairs["copy"]
    with open(pairs["image"], "rb") as f:
        data_url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    image_content = [{"type": "text", "text": PICTURE}, {"type": "image_url", "image_url": {"url": data_url}}]
    answers, logs = {}, {}
    for name, extra in (("plain", ()), ("ours", ("--draft-model", str(drafter), "--draft-kind", patch_mlx_vlm.KIND))):
        logs[name] = []
        with vlm_server(target, *extra, log=logs[name]) as url:
            answers[name] = [chat(url, str(target), TEXT), chat(url, str(target), image_content),
                             chat(url, str(target), TEXT)]
            if name == "ours":  # concurrent clients: mlx-vlm may coalesce them into one batch
                with ThreadPoolExecutor(4) as pool:
                    together = list(pool.map(lambda c: chat(url, str(target), c), [TEXT, LONG, image_content, TEXT]))
            else:
                alone = [chat(url, str(target), c) for c in (TEXT, LONG, image_content, TEXT)]
    assert together == alone
    assert answers["ours"] == answers["plain"]
    assert all(answers["plain"])
    # Our loop served every request (one sequence at a time) and logged its statistics.
    assert logs["ours"][0].count("mlx-lm-dspark: Speculative: τ=") >= 3, logs["ours"][0]


# ---------------------------------------------------------------- failing loudly


def test_a_changed_host_fails_loudly():
    drafters = types.ModuleType("mlx_vlm.speculative.drafters")
    drafters.load_drafter = lambda path: None  # lost its `kind` parameter
    drafters.KNOWN_DRAFTER_KINDS = {"dflash"}
    with pytest.raises(HostMismatchError, match="kind"):
        patch_mlx_vlm.patch_drafters(drafters)

    ar = types.ModuleType("mlx_vlm.generate.ar")
    ar.run_speculative_rounds = lambda model, draft_model: None
    with pytest.raises(HostMismatchError, match="run_speculative_rounds"):
        patch_mlx_vlm.patch_ar(ar)

    dispatch = types.ModuleType("mlx_vlm.generate.dispatch")
    exec("import argparse\ndef parse_arguments():\n    return argparse.Namespace()\n", dispatch.__dict__)
    with pytest.raises(HostMismatchError, match="ArgumentParser"):
        patch_mlx_vlm.patch_dispatch(dispatch)

    # A parser whose --draft-kind has no choices any more: caught when it parses.
    cli = types.ModuleType("mlx_vlm.server.cli")
    exec("import argparse\ndef main(argv):\n    p = argparse.ArgumentParser()\n"
         "    p.add_argument('--draft-kind')\n    return p.parse_args(argv)\n", cli.__dict__)
    patch_mlx_vlm.patch_server_cli(cli)
    with pytest.raises(HostMismatchError, match="--draft-kind"):
        cli.main([])


def test_the_installed_host_is_patched():
    for name in ("mlx_vlm.speculative.drafters", "mlx_vlm.generate.ar", "mlx_vlm.generate.dispatch",
                 "mlx_vlm.server.cli"):
        assert importlib.import_module(name)._mlx_lm_dspark_patched, name
