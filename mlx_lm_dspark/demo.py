"""Plain vs speculative decoding on the trained demo pair shipped with the package.

    mlx_lm_dspark.demo                       # built-in code prompts
    mlx_lm_dspark.demo --prompt "def parse_args(argv):" --max-tokens 200

The pair (``mlx_lm_dspark/demo_pair``, reproduced by
``scripts/make_demo_pair.py``) is a small Qwen3-architecture code model
trained on the Python standard library's source and its DSpark drafter,
both 4-bit.  Each prompt is generated through mlx-lm's own
``stream_generate``, once plainly and once with ``draft_model=``: the demo
prints the completion (accepted drafts highlighted on a terminal), checks
the two texts are identical, and reports τ and the speed-up.  No network.
"""

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

PAIR_DIR = Path(__file__).resolve().parent / "demo_pair"

PROMPTS = [
    'def read_lines(path):\n    """Return the lines of the file at *path*, without newlines."""\n',
    "class Stack:\n    \"\"\"A last-in, first-out stack.\"\"\"\n\n    def __init__(self):\n",
    "import os\nimport sys\n\n\ndef main(argv=None):\n    if argv is None:\n        argv = sys.argv[1:]\n",
    "    def __repr__(self):\n        return ",
]


def pair_paths(pair_dir: Optional[Path] = None):
    """(target, drafter) directories of the demo pair, or a clear error."""
    root = Path(pair_dir) if pair_dir else PAIR_DIR
    target, drafter = root / "target", root / "drafter"
    for d in (target, drafter):
        if not (d / "config.json").is_file():
            raise FileNotFoundError(
                f"The demo pair is incomplete: {d}/config.json is missing. Reinstall mlx-lm-dspark, or "
                "rebuild the pair with `python scripts/make_demo_pair.py` from a checkout."
            )
    return target, drafter


@dataclass
class Run:
    text: str
    tokens: List[int]
    from_draft: List[bool]
    seconds: float  # first token to last: generation only, like mlx-lm's generation_tps

    @property
    def tokens_per_s(self) -> float:
        return (len(self.tokens) - 1) / self.seconds if self.seconds > 0 and len(self.tokens) > 1 else 0.0


def generate(model, tokenizer, prompt: str, max_tokens: int, **kwargs) -> Run:
    from mlx_lm import stream_generate

    tokens, flags, text, first = [], [], [], None
    for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, **kwargs):
        if first is None:
            first = time.perf_counter()
        tokens.append(r.token)
        flags.append(bool(getattr(r, "from_draft", False)))
        text.append(r.text)
    return Run("".join(text), tokens, flags, time.perf_counter() - first if first else 0.0)


def highlight(tokenizer, run: Run, color: bool) -> str:
    """The completion, accepted drafts in green when ``color``."""
    if not color:
        return run.text
    out, detok = [], tokenizer.detokenizer
    detok.reset()
    for token, drafted in zip(run.tokens, run.from_draft):
        detok.add_token(token)
        piece = detok.last_segment
        out.append(f"\033[32m{piece}\033[0m" if drafted and piece else piece)
    detok.finalize()
    out.append(detok.last_segment)
    return "".join(out)


def first_difference(a: List[int], b: List[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def run(argv=None) -> dict:
    """The command line; returns per-prompt and overall results."""
    from mlx_lm import load

    from .loader import load_drafter, user_errors
    from .session import last_stats
    from .speculative import bind

    p = argparse.ArgumentParser(prog="mlx_lm_dspark.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", action="append", default=None, help="A prompt (repeatable); default: built-in code prompts.")
    p.add_argument("--max-tokens", "-m", type=int, default=160)
    p.add_argument("--num-draft-tokens", type=int, default=None,
                   help="Most drafts per round, at most the drafter's block (default: chosen each round "
                        "from this machine's measured costs).")
    p.add_argument("--pair", type=Path, default=None, help="Another pair directory (target/ and drafter/).")
    p.add_argument("--dequantize", action="store_true",
                   help="Run the pair in float (on a CPU, mlx's quantized matmuls cost about K times one token "
                        "to verify K; float matmuls with OpenBLAS preloaded verify a block nearly free).")
    p.add_argument("--color", action=argparse.BooleanOptionalAction, default=None,
                   help="Highlight accepted drafts (default: on a terminal).")
    args = p.parse_args(argv)
    if args.max_tokens < 1:
        p.error("--max-tokens must be at least 1")
    if args.num_draft_tokens is not None and args.num_draft_tokens < 0:
        p.error("--num-draft-tokens must be at least 0")
    try:
        target_dir, drafter_dir = pair_paths(args.pair)
    except FileNotFoundError as e:
        p.error(str(e))
    color = sys.stdout.isatty() if args.color is None else args.color

    try:
        model, tokenizer = load(str(target_dir))
        drafter = load_drafter(str(drafter_dir), bits=None)  # stored 4-bit
        bind(drafter, model)
    except user_errors() as e:
        p.error(str(e))
    if args.dequantize:
        from mlx_lm.utils import dequantize_model

        model, drafter = dequantize_model(model), dequantize_model(drafter)
    spec = {"draft_model": drafter}
    if args.num_draft_tokens is not None:
        spec["num_draft_tokens"] = args.num_draft_tokens
    print(f"target : {target_dir}")
    print(f"drafter: {drafter_dir} ({drafter.kind}, block {drafter.block_size})")
    print(f"same as: mlx_lm.generate --model {target_dir} --draft-model {drafter_dir} --prompt ...\n")

    generate(model, tokenizer, "import", 8)  # warm-up: first calls compile and allocate
    generate(model, tokenizer, "import", 8, **spec)

    results, plain_s, spec_s, plain_n, spec_n = [], 0.0, 0.0, 0, 0
    for prompt in args.prompt or PROMPTS:
        plain = generate(model, tokenizer, prompt, args.max_tokens)
        fast = generate(model, tokenizer, prompt, args.max_tokens, **spec)
        stats = last_stats(drafter)
        same = plain.tokens == fast.tokens
        print("─" * 72)
        print(prompt + highlight(tokenizer, fast, color))
        print("─" * 72)
        if not same:
            at = first_difference(plain.tokens, fast.tokens)
            print(f"MISMATCH at token {at}: plain {plain.tokens[at:at + 5]} vs speculative {fast.tokens[at:at + 5]}")
            print(f"plain text:\n{plain.text}")
        speedup = fast.tokens_per_s / plain.tokens_per_s if plain.tokens_per_s else 0.0
        print(f"identical: {'yes' if same else 'NO'} | plain {plain.tokens_per_s:.1f} tok/s | speculative "
              f"{fast.tokens_per_s:.1f} tok/s | {speedup:.2f}x | τ {stats.mean_acceptance_length:.2f} "
              f"over {stats.rounds} rounds\n")
        results.append({"prompt": prompt, "identical": same, "tokens": len(fast.tokens),
                        "plain_tokens_per_s": plain.tokens_per_s, "speculative_tokens_per_s": fast.tokens_per_s,
                        "speedup": speedup, "tau": stats.mean_acceptance_length, "rounds": stats.rounds,
                        "accepted": stats.accepted})
        plain_s += plain.seconds
        spec_s += fast.seconds
        plain_n += len(plain.tokens) - 1
        spec_n += len(fast.tokens) - 1
    rounds = sum(r["rounds"] for r in results)
    overall = {
        "identical": all(r["identical"] for r in results),
        "tau": (sum(r["accepted"] for r in results) + rounds) / rounds if rounds else 0.0,
        "plain_tokens_per_s": plain_n / plain_s if plain_s else 0.0,
        "speculative_tokens_per_s": spec_n / spec_s if spec_s else 0.0,
    }
    overall["speedup"] = (overall["speculative_tokens_per_s"] / overall["plain_tokens_per_s"]
                          if overall["plain_tokens_per_s"] else 0.0)
    print(f"overall: identical {'yes' if overall['identical'] else 'NO'} | τ {overall['tau']:.2f} | plain "
          f"{overall['plain_tokens_per_s']:.1f} tok/s | speculative {overall['speculative_tokens_per_s']:.1f} tok/s"
          f" | speed-up {overall['speedup']:.2f}x")
    return {"prompts": results, "overall": overall}


def main(argv=None) -> None:
    results = run(argv)
    if not results["overall"]["identical"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
