"""Training a DSpark drafter for a target on a small corpus.

    python examples/train_drafter.py [--model T] [--data corpus.jsonl] [--iters N] [--output DIR]

Without --model it builds a tiny random Qwen3 target, and without --data it
writes a small JSONL corpus of ``{"text": ...}`` records, so it runs offline in
seconds (both in a temporary directory, removed at the end, as is the drafter
unless --output is given).  The target stays frozen; the drafter learns to
predict the target's own next-token distributions on the corpus.  A few steps
on a random target show the mechanics (the loss falls); a useful drafter needs
a real target and many more steps (the trainer then also reports held-out τ,
``eval_every``).  The trained drafter is loaded and used with
``stream_generate``; its output must equal plain decoding.  The command-line
equivalent is ``mlx_lm_dspark.train --model T --data corpus.jsonl --output DIR``.
"""

import argparse
import json
import random
import tempfile
from pathlib import Path

from mlx_lm import load, stream_generate

import mlx_lm_dspark
from mlx_lm_dspark.train import TrainingArgs, train


def write_corpus(path, records=48, seed=0):
    from mlx_lm_dspark_tools.tiny import COMMON_WORDS

    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(records):
            f.write(json.dumps({"text": " ".join(rng.choices(COMMON_WORDS, k=rng.randint(24, 48)))}) + "\n")
    return path


def train_and_use(args, work: Path):
    if args.model is None:
        from mlx_lm_dspark_tools.tiny import build_pair

        args.model, _ = build_pair(work / "pair", family="qwen3")  # its random drafter is not used
    data = args.data or write_corpus(work / "corpus.jsonl")
    output = Path(args.output or work / "drafter")

    settings = TrainingArgs(markov_rank=16, num_layers=1, block_size=4, iters=args.iters, batch_size=4,
                            seq_length=64, anchors_per_seq=8, learning_rate=1e-2, eval_every=0,
                            save_every=0, progress=False)
    train(str(args.model), data, settings, output=output)
    history = json.loads((output / "trainer_state.json").read_text())["history"]
    losses = [h["loss"] for h in history if "loss" in h]
    print(f"trained drafter: {output}")
    print(f"training loss over {len(losses)} steps: {losses[0]:.3f} -> {losses[-1]:.3f}")

    model, tokenizer = load(str(args.model))
    drafter = mlx_lm_dspark.load_drafter(output, bits=None)  # keep float weights
    prompt = "the quick brown fox"
    plain = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=32)]
    ours = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=32, draft_model=drafter,
                                             num_draft_tokens=3)]
    print(f"identical to plain decoding: {ours == plain}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="mlx-lm Qwen3 or Gemma-4 target (default: a tiny random one).")
    parser.add_argument("--data", help="JSONL of {'text'|'messages'|'turns': ...} or a .txt file.")
    parser.add_argument("--output", help="Where the drafter is written (default: a temporary directory).")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dspark-train-example-") as work:
        train_and_use(args, Path(work))


if __name__ == "__main__":
    main()
