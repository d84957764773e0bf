"""Train a DSpark, a DFlash and an EAGLE3 drafter for one tiny target and benchmark them side by side.

    python scripts/compare_kinds.py DIR [--iters 80] [benchmark options, e.g. --num-draft-tokens 3]

The target is a tiny Qwen3 (4 layers, hidden 64, vocabulary 512) whose
attention and MLP outputs are zeroed, so its greedy next token is a fixed
function of the current one: a text small drafters learn in a few dozen
steps.  The corpus is its own greedy text from random two-token openings.
Each drafter is trained by ``mlx_lm_dspark.train`` with the same settings
(one layer, 4 drafts per round, taps 0-2), then ``mlx_lm_dspark.benchmark``
runs the three on the target in one run; options after DIR and --iters go
to the benchmark.  It takes a minute or two on a laptop CPU.
"""

import argparse
import json
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.cache import make_prompt_cache

from mlx_lm_dspark import train
from mlx_lm_dspark_tools import benchmark
from mlx_lm_dspark_tools.tiny import make_qwen3_target, save_target

KINDS = ("dspark", "dflash", "eagle3")


def make_target(root: Path, sequences: int = 96, length: int = 48) -> None:
    """The target (with its tokenizer) in root/target and its greedy corpus in root/corpus.jsonl."""
    model, config = make_qwen3_target(num_layers=4)
    model.update(tree_unflatten([(k, v * 0) for k, v in tree_flatten(model.parameters())
                                 if k.endswith(("o_proj.weight", "down_proj.weight"))]))
    mx.eval(model.parameters())
    save_target(root / "target", model, config)
    tokens = mx.array(np.random.default_rng(0).integers(3, 500, (sequences, 2)).astype(np.int32))
    cache = make_prompt_cache(model)
    out, logits = [tokens], model(tokens, cache=cache)
    for _ in range(length - 2):
        out.append(mx.argmax(logits[:, -1:], axis=-1).astype(mx.int32))
        logits = model(out[-1], cache=cache)
    with open(root / "corpus.jsonl", "w") as f:
        for seq in np.array(mx.concatenate(out, axis=1)).tolist():
            f.write(json.dumps(seq) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--iters", type=int, default=80)
    args, bench_options = parser.parse_known_args(argv)
    root = args.dir
    root.mkdir(parents=True, exist_ok=True)
    make_target(root)
    for kind in KINDS:
        start = time.perf_counter()
        train.run(["--algorithm", kind, "--model", str(root / "target"), "--data", str(root / "corpus.jsonl"),
                   "--output", str(root / kind), "--iters", str(args.iters), "--batch-size", "4",
                   "--block-size", "4", "--num-layers", "1", "--target-layer-ids", "0", "1", "2",
                   "--learning-rate", "1e-2", "--eval-every", str(args.iters), "--eval-sequences", "8",
                   "--save-every", "0", "--quiet"])
        evals = [h for h in json.loads((root / kind / "trainer_state.json").read_text())["history"] if "tau" in h]
        print(f"{kind}: trained in {time.perf_counter() - start:.0f} s, held-out τ "
              + " -> ".join(f"{e['tau']:.2f}" for e in evals))
    benchmark.run(["--model", str(root / "target"), *(x for k in KINDS for x in ("--draft-model", str(root / k))),
                   "--draft-bits", "none", *bench_options])


if __name__ == "__main__":
    main()
