"""The mlx-lm integration, exercised the way users run it: console scripts,
unchanged scripts, and the patches' own safety checks."""

import importlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import mlx_lm
import pytest

from mlx_lm_dspark.hosts import mlx_lm as patch_mlx_lm
from mlx_lm_dspark_tools.tiny import build_pair, save_qwen3_target

BIN = Path(sys.executable).parent
PROMPT = "the quick brown fox jumps over the lazy dog and the cat"


def run(args, env=None, check=True):
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(args, capture_output=True, text=True, env=full_env, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return build_pair(tmp_path_factory.mktemp("cli"), family="qwen3")


def generated_text(stdout: str) -> str:
    # Between mlx-lm's "==========" separators (verbose) or the whole output.
    parts = stdout.split("==========")
    return parts[1].strip() if len(parts) >= 3 else stdout.strip()


@pytest.mark.slow
def test_console_script_same_text_with_and_without_drafter(pair):
    target, drafter = pair
    base = [str(BIN / "mlx_lm.generate"), "--model", str(target), "--prompt", PROMPT, "--max-tokens", "30"]
    plain = run(base)  # mlx_lm.generate is verbose by default
    spec = run(base + ["--draft-model", str(drafter)])
    assert generated_text(plain.stdout) == generated_text(spec.stdout) != ""
    assert "Speculative: τ=" in spec.stdout and "Speculative" not in plain.stdout
    quiet = ["--verbose", "False"]
    plain_quiet = run(base + quiet).stdout
    options = ["--draft-bits", "none", "--draft-block-size", "3", "--num-draft-tokens", "2"]
    assert run(base + quiet + ["--draft-model", str(drafter), *options]).stdout == plain_quiet
    assert plain_quiet.strip() == generated_text(plain.stdout)


def test_python_dash_m_mlx_lm_generate(pair):
    target, drafter = pair
    args = ["generate", "--model", str(target), "--prompt", PROMPT, "--max-tokens", "20"]
    plain = run([sys.executable, "-m", "mlx_lm", *args])
    spec = run([sys.executable, "-m", "mlx_lm", *args, "--draft-model", str(drafter)])
    assert generated_text(plain.stdout) == generated_text(spec.stdout) != ""
    assert "Speculative: τ=" in spec.stdout


def test_help_shows_drafter_group():
    out = run([str(BIN / "mlx_lm.generate"), "--help"], env={"COLUMNS": "400"}).stdout
    assert "speculative drafter (mlx-lm-dspark)" in out
    for flag in ("--draft-bits", "--draft-block-size", "--draft-confidence"):
        assert flag in out
    # The help says what the defaults are.
    assert "chosen each round from this machine's measured costs" in out
    assert "Default: auto (4 bits for a float drafter, a quantized one as stored)" in out


@pytest.mark.slow
def test_bad_flags_are_refused(pair):
    target, drafter = pair
    base = [str(BIN / "mlx_lm.generate"), "--model", str(target), "--draft-model", str(drafter)]
    bits = "expected one of 1, 2, 3, 4, 5, 6, 8, 'none' or 'auto'"
    for flags, message in [(["--draft-bits", "7"], f"{bits}, got '7'"), (["--draft-bits", "0"], f"{bits}, got '0'"),
                           (["--draft-bits", "foo"], f"{bits}, got 'foo'"),
                           (["--draft-confidence", "1.5"], "[0, 1]"),
                           (["--draft-confidence", "x"], "expected a value in [0, 1], got 'x'"),
                           (["--num-draft-tokens", "-1"], ">= 0"), (["--draft-block-size", "0"], ">= 1"),
                           (["--draft-block-size", "two"], "expected an integer >= 1, got 'two'")]:
        proc = run(base + flags, check=False)
        assert proc.returncode == 2 and message in proc.stderr.splitlines()[-1], (flags, proc.stderr)
        assert "Traceback" not in proc.stderr


def one_line_error(proc, prog="mlx_lm.generate"):
    """The one stderr line of a refused run (exit status 2, no traceback)."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in lines if line.startswith(f"{prog}: error:") or line.startswith("mlx-lm-dspark:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


@pytest.fixture(scope="module")
def other_pair(tmp_path_factory):
    """A pair of another size: its drafter fits neither the vocabulary nor the
    width of ``pair``'s target, and taps a layer it lacks."""
    return build_pair(tmp_path_factory.mktemp("other"), family="qwen3", hidden_size=32, vocab_size=256,
                      num_layers=4, target_layer_ids=(1, 2))


def test_ordinary_mistakes_end_in_one_line(pair, other_pair, tmp_path):
    target, drafter = pair
    other_target, other_drafter = other_pair
    base = [str(BIN / "mlx_lm.generate"), "--prompt", PROMPT, "--max-tokens", "4"]

    line = one_line_error(run(base + ["--model", str(target), "--draft-model", str(drafter),
                                      "--draft-block-size", "99"], check=False))
    assert "block_size 99 is not available" in line and "from 1 to 7" in line

    for model, draft, taps in [(target, other_drafter, False), (other_target, drafter, True)]:
        line = one_line_error(run(base + ["--model", str(model), "--draft-model", str(draft)], check=False))
        assert "does not match the target model" in line and "vocab_size: drafter" in line
        assert "hidden_size: drafter" in line and "tokenizer" not in line
        assert ("out of range: [5]" in line) == taps

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes((Path(drafter) / "model.safetensors").read_bytes())
    config = json.loads((Path(drafter) / "config.json").read_text())
    config["mask_token_id"] = 100_000
    (broken / "config.json").write_text(json.dumps(config))
    line = one_line_error(run(base + ["--model", str(target), "--draft-model", str(broken)], check=False))
    assert "mask_token_id is 100000, outside the vocabulary" in line and str(broken) in line


def test_a_clamped_draft_count_is_said_once(pair):
    target, drafter = pair
    proc = run([str(BIN / "mlx_lm.generate"), "--model", str(target), "--draft-model", str(drafter),
                "--prompt", PROMPT, "--max-tokens", "12", "--num-draft-tokens", "99"])
    said = [line for line in proc.stderr.splitlines() if "num_draft_tokens 99" in line]
    assert said == ["mlx-lm-dspark: num_draft_tokens 99 is more than this drafter proposes per round; "
                    "drafting at most 7."]
    assert "draft cap 7" in proc.stdout


def test_python_dash_m_on_the_generate_module_is_refused_in_one_line(pair):
    """``python -m mlx_lm.generate`` runs a private, unpatched copy of the
    module: refused with the commands that work (plain use is untouched)."""
    target, drafter = pair
    args = ["--model", str(target), "--prompt", PROMPT, "--max-tokens", "4"]
    line = one_line_error(run([sys.executable, "-m", "mlx_lm.generate", *args, "--draft-model", str(drafter)],
                              check=False))
    assert "run `mlx_lm.generate ...` or `python -m mlx_lm generate ...` instead" in line
    assert run([sys.executable, "-m", "mlx_lm.generate", *args]).returncode == 0


def test_server_refuses_a_bad_pair_at_start_up_in_one_line(pair, other_pair):
    target, drafter = pair
    _, other_drafter = other_pair
    for flags, message in [(["--draft-model", str(other_drafter)], "does not match the target model"),
                           (["--draft-model", str(drafter), "--draft-block-size", "8"], "block_size 8")]:
        proc = run([str(BIN / "mlx_lm.server"), "--model", str(target), *flags, "--port", "0"], check=False)
        assert message in one_line_error(proc, "mlx_lm.server")


def test_server_measures_at_start_up(pair, tmp_path, monkeypatch):
    """The drafter is loaded, bound and the machine's costs measured when the
    server starts, not inside the first request."""
    server = importlib.import_module("mlx_lm.server")
    target, drafter = pair
    monkeypatch.setenv("MLX_LM_DSPARK_CACHE", str(tmp_path))
    providers = []
    monkeypatch.setattr(server, "run", lambda host, port, provider: providers.append(provider))
    monkeypatch.setattr(sys, "argv", ["mlx_lm.server", "--model", str(target), "--draft-model", str(drafter)])
    server.main()
    assert providers[0].draft_model is not None and providers[0].draft_model.kind == "dspark"
    assert len(list(tmp_path.glob("cost-*.json"))) == 1  # measured and cached before any request


def test_ordinary_draft_model_still_uses_mlx_lm_step(pair, tmp_path):
    target, _ = pair
    model, tokenizer = mlx_lm.load(str(target))
    draft_dir = tmp_path / "small-draft"
    save_qwen3_target(draft_dir, num_layers=2, seed=5)
    draft, _ = mlx_lm.load(str(draft_dir))
    prompt = tokenizer.encode(PROMPT)
    plain = [r.token for r in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=20)]
    for n in (None, 2):
        kw = {} if n is None else {"num_draft_tokens": n}
        spec = list(mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=20, draft_model=draft, **kw))
        assert [r.token for r in spec] == plain


@pytest.mark.parametrize("max_kv_size", [6, 9, 16, 64])
def test_max_kv_size_with_a_drafter_decodes_like_plain(pair, max_kv_size):
    """mlx-lm drops ``max_kv_size`` for draft models; with ours the rotating
    cache plain decoding builds is used, before and after it wraps."""
    from mlx_lm_dspark.target import text_args
    from mlx_lm_dspark_tools.oracle import OracleDrafter

    target, _ = pair
    model, tokenizer = mlx_lm.load(str(target))
    prompt = tokenizer.encode(PROMPT)
    kw = dict(max_tokens=40, max_kv_size=max_kv_size)
    plain = [r.token for r in mlx_lm.stream_generate(model, tokenizer, prompt, **kw)]
    drafter = OracleDrafter(text_args(model), list(prompt) + plain, block_size=6, right=lambda pos: pos % 5 != 0)
    spec = [r.token for r in mlx_lm.stream_generate(model, tokenizer, prompt, draft_model=drafter, **kw)]
    assert spec == plain
    text = mlx_lm.generate(model, tokenizer, prompt, draft_model=drafter, **kw)
    assert text == mlx_lm.generate(model, tokenizer, prompt, **kw)


FAKE_GENERATE = """
def speculative_generate_step(prompt, model, draft_model, stream=None, *, num_draft_tokens=2,
                              max_tokens=256, sampler=None, logits_processors=None,
                              prompt_cache=None, prefill_step_size=512, kv_bits=None,
                              kv_group_size=64, quantized_kv_start=5000):
    pass

def stream_generate(model, tokenizer, prompt, max_tokens=256, draft_model=None, **kwargs):
    return speculative_generate_step(prompt, model, draft_model)

def make_prompt_cache(model, max_kv_size=None):
    pass

def setup_arg_parser():
    pass

def generate(model, tokenizer, prompt, verbose=False):
    pass

def main():
    setup_arg_parser(), load(), generate()
"""


def _fake_generate_module(**overrides):
    """A stand-in for mlx_lm.generate with the shape the patch expects."""
    module = types.ModuleType("mlx_lm.generate_fake")
    exec(FAKE_GENERATE, module.__dict__)
    for name, value in overrides.items():
        setattr(module, name, value)
    return module


def test_patches_fail_loudly_when_host_changes():
    patch_mlx_lm.patch_generate(_fake_generate_module())  # the expected shape patches fine

    def step_without_stream(prompt, model, draft_model, *, num_draft_tokens=2, max_tokens=256,
                            sampler=None, logits_processors=None, prompt_cache=None,
                            prefill_step_size=512, kv_bits=None, kv_group_size=64, quantized_kv_start=0):
        pass

    patch_mlx_lm.patch_generate(_fake_generate_module(speculative_generate_step=step_without_stream))  # 0.31

    def renamed(prompt, model, drafter, stream=None):
        pass

    def new_option(prompt, model, draft_model, stream=None, *, num_draft_tokens=2, max_tokens=256,
                   sampler=None, logits_processors=None, prompt_cache=None, prefill_step_size=512,
                   kv_bits=None, kv_group_size=64, quantized_kv_start=5000, draft_temperature=None):
        pass

    for changed in (renamed, new_option):
        with pytest.raises(patch_mlx_lm.HostMismatchError, match="speculative_generate_step"):
            patch_mlx_lm.patch_generate(_fake_generate_module(speculative_generate_step=changed))

    def stream_generate(model, tokenizer, prompt):
        return None  # no longer looks the step up as a module global

    with pytest.raises(patch_mlx_lm.HostMismatchError, match="stream_generate"):
        patch_mlx_lm.patch_generate(_fake_generate_module(stream_generate=stream_generate))

    def without_options(model, tokenizer, prompt, draft_model=None):
        return speculative_generate_step(prompt, model, draft_model)  # noqa: F821 (never called)

    with pytest.raises(patch_mlx_lm.HostMismatchError, match="kwargs"):
        patch_mlx_lm.patch_generate(_fake_generate_module(stream_generate=without_options))
    from mlx_lm.models import cache as cache_module

    stock_make_prompt_cache = cache_module.make_prompt_cache
    cache_module.make_prompt_cache = lambda model: None  # no max_kv_size any more
    try:
        with pytest.raises(patch_mlx_lm.HostMismatchError, match="make_prompt_cache"):
            patch_mlx_lm.patch_generate(_fake_generate_module())
    finally:
        cache_module.make_prompt_cache = stock_make_prompt_cache

    utils = types.ModuleType("mlx_lm.utils_fake")
    utils.load_model = lambda model_path, lazy=False, strict=True, model_config=None: None
    utils.load_tokenizer = lambda model_path: None
    utils.load = lambda path: None
    with pytest.raises(patch_mlx_lm.HostMismatchError, match="load_tokenizer"):
        patch_mlx_lm.patch_utils(utils)


def test_our_step_takes_every_known_host_shape():
    """The dispatch forwards the caller's arguments unchanged to our step."""
    import inspect

    from mlx_lm_dspark.speculative import speculative_generate_step

    ours = list(inspect.signature(speculative_generate_step).parameters)
    newest, older = patch_mlx_lm.SPECULATIVE_STEP_SHAPES
    assert ours == newest
    assert set(older) <= set(ours)  # 0.31 takes everything after draft_model by keyword


def test_generate_module_is_patched_once():
    gen = sys.modules["mlx_lm.generate"]
    assert gen._mlx_lm_dspark_patched
    assert gen.speculative_generate_step.__wrapped__.__module__ == "mlx_lm.generate"
    assert mlx_lm.generate is gen.generate


@pytest.mark.slow
def test_sampling_flags_with_a_drafter(pair):
    """--temp/--top-p/--top-k/--min-p/--seed reach the p/q rule; a seed makes
    the run reproducible.  (Distributional exactness is tested in
    test_speculative_sampling.)"""
    target, drafter = pair
    base = [str(BIN / "mlx_lm.generate"), "--model", str(target), "--draft-model", str(drafter),
            "--prompt", PROMPT, "--max-tokens", "24", "--temp", "0.8", "--top-p", "0.9", "--top-k", "40",
            "--min-p", "0.02", "--seed", "7"]
    first, second = run(base).stdout, run(base).stdout
    assert generated_text(first) == generated_text(second) != ""
    assert "acceptance rule: p/q" in first
    other = run(base[:-1] + ["8"]).stdout
    assert generated_text(other) != generated_text(first)
