"""Speculative decoding from Python: mlx-lm's ``stream_generate`` with a DSpark drafter.

    python examples/python_api.py
    python examples/python_api.py --model T --draft-model D --prompt "..." --max-tokens 128

Without arguments it uses the trained demo pair shipped in the package (a small
code model and its drafter), offline.  It prints the completion, checks that it
equals plain decoding (greedy: token for token) and prints the acceptance
statistics of the speculative run.
"""

import argparse

from mlx_lm import load, stream_generate

import mlx_lm_dspark
from mlx_lm_dspark.demo import pair_paths

PROMPT = 'class Stack:\n    """A last-in, first-out stack."""\n\n    def __init__(self):\n'


def print_stats(drafter):
    stats = mlx_lm_dspark.last_stats(drafter)
    print(stats.summary())


def main():
    demo_target, demo_drafter = pair_paths()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(demo_target), help="Target model (path or Hugging Face repo).")
    parser.add_argument("--draft-model", default=str(demo_drafter), help="DSpark / DFlash drafter.")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--num-draft-tokens", type=int, default=None,
                        help="Fixed drafts per round (default: chosen each round).")
    args = parser.parse_args()

    model, tokenizer = load(args.model)
    drafter = mlx_lm_dspark.load_drafter(args.draft_model)  # 4-bit on load unless bits=None

    plain = "".join(r.text for r in stream_generate(model, tokenizer, args.prompt, max_tokens=args.max_tokens))

    extra = {} if args.num_draft_tokens is None else {"num_draft_tokens": args.num_draft_tokens}
    pieces, from_draft = [], 0
    for response in stream_generate(model, tokenizer, args.prompt, max_tokens=args.max_tokens,
                                    draft_model=drafter, **extra):
        print(response.text, end="", flush=True)
        pieces.append(response.text)
        from_draft += response.from_draft  # True for tokens that were accepted drafts
    print()
    print(f"identical to plain decoding: {''.join(pieces) == plain}")
    print(f"tokens from accepted drafts: {from_draft}")
    print_stats(drafter)


if __name__ == "__main__":
    main()
