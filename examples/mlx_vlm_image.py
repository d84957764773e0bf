"""A Gemma-4 image prompt through mlx-vlm with our drafter (draft kind ``mlx-lm-dspark``).

    python examples/mlx_vlm_image.py [--model T --draft-model D --image PNG] [--draft-block-size W]

Needs the ``vlm`` extra (mlx-vlm).  Without --model it builds a tiny random
Gemma-4 vision-language pair and a test image in a temporary directory
(removed at the end), so it runs offline; a random drafter earns little, so pass ``--draft-block-size W``
(verify width: W - 1 drafts per round) to watch it draft.  mlx-vlm prefills
the prompt, vision tower included; our round loop decodes the text, and the
output must equal mlx-vlm's plain greedy decoding.
"""

import argparse
import tempfile

from mlx_vlm import load, stream_generate
from mlx_vlm.prompt_utils import apply_chat_template
from mlx_vlm.speculative.drafters import load_drafter

import mlx_lm_dspark


def print_stats(drafter):
    stats = mlx_lm_dspark.last_stats(drafter)
    print(stats.summary())


def token_ids(model, processor, prompt, image, max_tokens, **kwargs):
    formatted = apply_chat_template(processor, model.config, prompt, num_images=1)
    last = None
    for last in stream_generate(model, processor, formatted, image=[image], max_tokens=max_tokens,
                                temperature=0.0, **kwargs):
        pass
    return list(last.token_ids)


def run(args):
    model, processor = load(str(args.model))
    drafter, kind = load_drafter(str(args.draft_model), kind="mlx-lm-dspark")
    extra = {} if args.draft_block_size is None else {"draft_block_size": args.draft_block_size}

    plain = token_ids(model, processor, args.prompt, args.image, args.max_tokens)
    ours = token_ids(model, processor, args.prompt, args.image, args.max_tokens,
                     draft_model=drafter, draft_kind=kind, **extra)
    print("reply:", processor.tokenizer.decode(ours))
    print(f"identical to plain decoding: {ours == plain}")
    print_stats(drafter)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="Gemma-4 mlx-vlm checkpoint (default: a tiny random one).")
    parser.add_argument("--draft-model", help="DSpark drafter for it.")
    parser.add_argument("--image", help="An image file (default: a generated test image).")
    parser.add_argument("--prompt", default="describe this picture in a few words")
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--draft-block-size", type=int, default=None, help="Fixed verify width W (drafts + 1).")
    args = parser.parse_args()
    if args.model and not (args.draft_model and args.image):
        parser.error("--model needs --draft-model and --image too")
    with tempfile.TemporaryDirectory(prefix="dspark-vlm-example-") as work:
        if args.model is None:
            from mlx_lm_dspark_tools.tiny_vlm import build_vlm_pair, make_image

            args.model, args.draft_model = build_vlm_pair(work, kind="copy")
            args.image = args.image or make_image(f"{work}/image.png")
        run(args)


if __name__ == "__main__":
    main()
