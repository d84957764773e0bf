"""The mlx-lm integration, exercised the way users run it: console scripts,
unchanged scripts, and the patches' own safety checks."""

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
    out = run([str(BIN / "mlx_lm.generate"), "--help"]).stdout
    assert "speculative drafter (mlx-lm-dspark)" in out
    for flag in ("--draft-bits", "--draft-block-size", "--draft-confidence"):
        assert flag in out


@pytest.mark.slow
def test_bad_flags_are_refused(pair):
    target, drafter = pair
    base = [str(BIN / "mlx_lm.generate"), "--model", str(target), "--draft-model", str(drafter)]
    for flags, message in [(["--draft-bits", "7"], "--draft-bits"),
                           (["--draft-confidence", "1.5"], "[0, 1]"),
                           (["--num-draft-tokens", "-1"], ">= 0"), (["--draft-block-size", "0"], ">= 1")]:
        proc = run(base + flags, check=False)
        assert proc.returncode != 0 and message in proc.stderr


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


FAKE_GENERATE = """
def speculative_generate_step(prompt, model, draft_model, stream=None, *, num_draft_tokens=2,
                              max_tokens=256, sampler=None, logits_processors=None,
                              prompt_cache=None, prefill_step_size=512, kv_bits=None,
                              kv_group_size=64, quantized_kv_start=5000):
    pass

def stream_generate(model, tokenizer, prompt):
    return speculative_generate_step(prompt, model, None)

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
