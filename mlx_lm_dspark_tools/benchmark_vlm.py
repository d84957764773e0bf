"""Our round loop against mlx-vlm's native DSpark loop, same target and drafter weights.

    python -m mlx_lm_dspark_tools.benchmark_vlm --tiny DIR          # builds the tiny Gemma-4 pair in DIR
    python -m mlx_lm_dspark_tools.benchmark_vlm --model T --draft-model D [--image PNG]

Per prompt (text prompts, and the same prompts with an image when one is
given) and trial, runs mlx-vlm's plain decoding, its native DSpark loop
(``load_drafter`` without a kind) and ours (``--draft-kind mlx-lm-dspark``)
alternately through ``mlx_vlm.stream_generate``, checks that all three give
the same greedy tokens, and reports decode tokens/s (first token to last),
τ and the ratio ours / native.
"""

import argparse
import json
import time
from pathlib import Path

PROMPTS = [
    "the quick brown fox jumps over the lazy dog and then",
    "write a short story about a small red house near the river",
    "list three things you would take to a picnic in the park",
    "what is the capital of the country with the longest coastline",
]
IMAGE_PROMPT = "describe this picture in a few words"


def setup_arg_parser():
    parser = argparse.ArgumentParser(description="mlx-lm-dspark's round loop vs mlx-vlm's native DSpark loop.")
    parser.add_argument("--model", help="Gemma-4 target (mlx-vlm checkpoint).")
    parser.add_argument("--draft-model", help="DSpark drafter both loops can load.")
    parser.add_argument("--tiny", help="Build the tiny test pair (random target, copy drafter) in this directory.")
    parser.add_argument("--image", help="Also run an image prompt with this image.")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--draft-block-size", type=int, default=8,
                        help="Also run our loop with this fixed verify width (anchor included; 0: skip).")
    parser.add_argument("--json", help="Write the results here.")
    return parser


def timed_tokens(model, processor, prompt, image, max_tokens, **kwargs):
    from mlx_vlm import stream_generate
    from mlx_vlm.prompt_utils import apply_chat_template

    formatted = apply_chat_template(processor, model.config, prompt, num_images=0 if image is None else 1)
    first = last = None
    response = None
    for response in stream_generate(model, processor, formatted, image=[image] if image else None,
                                    max_tokens=max_tokens, temperature=0.0, **kwargs):
        last = time.perf_counter()
        first = first or last
    return list(response.token_ids), last - first


def tau(drafter) -> float:
    accepted, rounds = sum(drafter.accept_lens), len(drafter.accept_lens)
    return (accepted + rounds) / rounds if rounds else 1.0


def run(argv=None) -> dict:
    args = setup_arg_parser().parse_args(argv)
    if args.tiny:
        from .tiny_vlm import build_vlm_pair, make_image

        target, drafter_path = build_vlm_pair(args.tiny, "copy")
        args.model, args.draft_model = str(target), str(drafter_path)
        args.image = args.image or make_image(Path(args.tiny) / "image.png")
    if not (args.model and args.draft_model):
        raise SystemExit("Give --model and --draft-model, or --tiny DIR.")

    from mlx_vlm import load
    from mlx_vlm.speculative.drafters import load_drafter

    from mlx_lm_dspark.hosts.mlx_vlm import KIND

    model, processor = load(args.model)
    native, native_kind = load_drafter(args.draft_model)
    ours, our_kind = load_drafter(args.draft_model, kind=KIND)
    if type(native) is type(ours):
        raise SystemExit(f"mlx-vlm does not run {args.draft_model} natively: nothing to compare.")
    loops = {
        "plain": {},
        "native": {"draft_model": native, "draft_kind": native_kind},
        "ours": {"draft_model": ours, "draft_kind": our_kind},
    }
    if args.draft_block_size:
        loops["ours_fixed"] = {**loops["ours"], "draft_block_size": args.draft_block_size}
    cases = [(f"text-{i + 1}", p, None) for i, p in enumerate(PROMPTS)]
    if args.image:
        cases.append(("image", IMAGE_PROMPT, args.image))
    timed_tokens(model, processor, PROMPTS[0], None, 8, **loops["native"])  # warm-up
    timed_tokens(model, processor, PROMPTS[0], None, 8, **loops["ours"])

    rows = []
    for name, prompt, image in cases:
        seconds = dict.fromkeys(loops, 0.0)
        tokens = dict.fromkeys(loops, 0)
        taus = {loop: [] for loop in loops if loop != "plain"}
        for _ in range(args.trials):
            outputs = {}
            for loop, kwargs in loops.items():
                ids, dt = timed_tokens(model, processor, prompt, image, args.max_tokens, **kwargs)
                outputs[loop] = ids
                seconds[loop] += dt
                tokens[loop] += len(ids) - 1
                if loop in taus:
                    taus[loop].append(tau(kwargs["draft_model"]))
            if any(ids != outputs["plain"] for ids in outputs.values()):
                raise RuntimeError(f"Greedy outputs differ on {name}: {outputs}")
        rate = {loop: tokens[loop] / seconds[loop] for loop in loops}
        rows.append({
            "prompt": name, **{f"{loop}_tok_s": rate[loop] for loop in loops},
            **{f"{loop}_tau": sum(t) / len(t) for loop, t in taus.items()},
            **{f"{loop}_vs_native": rate[loop] / rate["native"] for loop in loops if loop.startswith("ours")},
            **{f"{loop}_vs_plain": rate[loop] / rate["plain"] for loop in loops if loop != "plain"},
        })

    ours = [loop for loop in loops if loop.startswith("ours")]
    header = (f"{'prompt':<9}" + "".join(f"{loop + ' tok/s':>17}" for loop in loops)
              + "".join(f"{'τ ' + loop:>14}" for loop in loops if loop != "plain")
              + "".join(f"{loop + '/native':>18}" for loop in ours) + f"{'native/plain':>14}")
    print(header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r['prompt']:<9}" + "".join(f"{r[loop + '_tok_s']:>17.1f}" for loop in loops)
              + "".join(f"{r[loop + '_tau']:>14.2f}" for loop in loops if loop != "plain")
              + "".join(f"{r[loop + '_vs_native']:>17.2f}x" for loop in ours) + f"{r['native_vs_plain']:>13.2f}x")
    results = {"model": args.model, "draft_model": args.draft_model, "max_tokens": args.max_tokens,
               "trials": args.trials, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


def main(argv=None) -> None:
    run(argv)


if __name__ == "__main__":
    main()
