"""Tiny random Gemma-4 vision-language targets for mlx-vlm, offline.

``build_vlm_pair(dir)`` writes a checkpoint ``mlx_vlm.load`` accepts (vision
tower, text model with sliding-window and KV-shared layers, no audio; a
WordPiece tokenizer carrying Gemma-4's media tokens, a chat template and a
tiny image processor) plus a DSpark drafter for it in the released layout.
``kind="copy"`` pairs a target that repeats tokens in runs with a drafter
whose Markov head always drafts "repeat the anchor", so acceptance is mixed
(accepts, partial rejections, rollbacks after the window wrapped).
Needs the ``vlm`` extra (mlx-vlm, pillow).
"""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from . import tiny

VOCAB = 512
# Gemma-4's media tokens, at the top of the tiny vocabulary (505 ... 511).
MEDIA_TOKENS = {
    "boi_token": "<|image>",
    "image_token": "<|image|>",
    "eoi_token": "<image|>",
    "boa_token": "<|audio>",
    "audio_token": "<|audio|>",
    "eoa_token": "<audio|>",
    "video_token": "<|video|>",
}
MEDIA_IDS = {name: VOCAB - len(MEDIA_TOKENS) + i for i, name in enumerate(MEDIA_TOKENS)}
TEXT_LAYERS = 4
TAPS = (1, 2, 3)
SLIDING_WINDOW = 8  # shorter than the test generations: the rotating caches wrap
# 4x4-pixel patches, 2x2 pooling, 4 soft tokens per image (images become 16x16).
PATCH, POOL, SOFT_TOKENS = 4, 2, 4

# Handles plain string content and mlx-vlm's list of parts.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}:"
    "{% if m['content'] is string %} {{ m['content'] }}"
    "{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %} <|image|>{% elif p['type'] == 'text' %} {{ p['text'] }}{% endif %}"
    "{% endfor %}{% endif %} | {% endfor %}"
    "{% if add_generation_prompt %}model:{% endif %}"
)


def write_tokenizer(path) -> None:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = tiny._vocabulary(VOCAB - len(MEDIA_TOKENS))
    for name, token in MEDIA_TOKENS.items():
        vocab[token] = MEDIA_IDS[name]
    core = Tokenizer(models.WordPiece(vocab, unk_token="<unk>", max_input_chars_per_word=100))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    core.add_special_tokens(list(MEDIA_TOKENS.values()))  # never split
    fast = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<eos>", unk_token="<unk>", pad_token="<pad>",
        clean_up_tokenization_spaces=False,
        extra_special_tokens=dict(MEDIA_TOKENS),  # the Gemma-4 processor reads tokenizer.image_token ...
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))


def target_config(k_eq_v=False) -> dict:
    text = tiny.gemma4_text_config(
        vocab_size=VOCAB, hidden_size=64, num_layers=TEXT_LAYERS, num_heads=4, num_kv_heads=2,
        head_dim=16, global_head_dim=32, intermediate_size=128, sliding_window=SLIDING_WINDOW,
        layer_types=tiny.gemma4_layer_types(TEXT_LAYERS, 2), num_kv_shared_layers=2,
        attention_k_eq_v=k_eq_v, hidden_size_per_layer_input=0, tie_word_embeddings=True,
    )
    text.pop("architectures")
    vision = {
        "model_type": "gemma4_vision", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16, "global_head_dim": 16,
        "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "patch_size": PATCH,
        "pooling_kernel_size": POOL, "position_embedding_size": 16, "default_output_length": SOFT_TOKENS,
        "rope_parameters": {"rope_theta": 100.0, "rope_type": "default"},
        "use_clipped_linears": False, "standardize": False,
    }
    return {
        "architectures": ["Gemma4ForConditionalGeneration"],
        "model_type": "gemma4",
        "text_config": text,
        "vision_config": vision,
        "audio_config": None,  # explicit: absent would build the full-size default audio tower
        "vocab_size": VOCAB,
        "hidden_size": 64,
        **{name.replace("_token", "_token_id"): i for name, i in MEDIA_IDS.items()},
        "vision_soft_tokens_per_image": SOFT_TOKENS,
        "eos_token_id": [tiny.EOS_ID],
        "pad_token_id": tiny.PAD_ID,
        "tie_word_embeddings": True,
        "dtype": "float32",
    }


def write_target(path, *, seed=0, post_norm_scale=tiny.GEMMA4_POST_NORM_SCALE, k_eq_v=False) -> dict:
    from mlx_vlm.utils import get_model_and_args, update_module_configs

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = target_config(k_eq_v)
    arch, _ = get_model_and_args(config)
    model_config = update_module_configs(arch.ModelConfig.from_dict(config), arch, config,
                                         ["text", "vision", "audio"])
    model = arch.Model(model_config)
    tiny._randomize(model, seed, 64, post_norm_scale=post_norm_scale)
    embed = model.language_model.model.embed_tokens
    embed.weight = embed.weight.at[tiny.EOS_ID].multiply(0.0)  # greedy runs go to max_tokens
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(path)
    (path / "processor_config.json").write_text(json.dumps({
        "processor_class": "Gemma4Processor",
        "image_seq_length": SOFT_TOKENS,
        "image_processor": {
            "image_processor_type": "Gemma4ImageProcessor", "patch_size": PATCH,
            "max_soft_tokens": SOFT_TOKENS, "pooling_kernel_size": POOL,
            "do_resize": True, "do_rescale": True, "do_normalize": False,
        },
    }, indent=2))
    return config


def write_drafter(path, config, target_dir, *, layout="deepspec", markov_rank=16, seed=1, **kw) -> dict:
    weights = mx.load(str(Path(target_dir) / "model.safetensors"))
    return tiny.save_drafter(path, config, layout=layout, markov_rank=markov_rank, block_size=7,
                             target_layer_ids=TAPS, num_drafter_layers=2, seed=seed,
                             target_weights=weights, **kw)


def write_copy_drafter(path, config, target_dir) -> dict:
    """Full-rank Markov factors w1 = 100·I, w2 = I: every draft repeats the anchor."""
    out = write_drafter(path, config, target_dir, markov_rank=VOCAB)
    weights = mx.load(str(Path(path) / "model.safetensors"))
    weights["markov_head.markov_w1.weight"] = 100.0 * mx.eye(VOCAB)
    weights["markov_head.markov_w2.weight"] = mx.eye(VOCAB)
    mx.save_safetensors(str(Path(path) / "model.safetensors"), weights, metadata={"format": "mlx"})
    return out


def write_eagle3_drafter(path, config, target_dir, *, seed=1) -> dict:
    """A random DeepSpec-layout EAGLE3 drafter with the target's embedding and head."""
    weights = mx.load(str(Path(target_dir) / "model.safetensors"))
    return tiny.save_eagle3_drafter(path, config, ttt_length=5, target_layer_ids=TAPS, seed=seed,
                                    target_weights=weights)


def make_image(path, seed=0) -> str:
    from PIL import Image

    pixels = (np.random.default_rng(seed).random((32, 32, 3)) * 255).astype(np.uint8)
    pixels[8:24, 8:24] = [255, 0, 0]
    Image.fromarray(pixels).save(path)
    return str(path)


def build_vlm_pair(root, kind="random"):
    """(target dir, drafter dir) under ``root``: ``random`` (a diverse target,
    a random drafter), ``copy`` (mixed acceptance, see the module docstring)
    ``k_eq_v`` (random, with Gemma-4's values-from-keys attention) or
    ``eagle3`` (the random target with a random EAGLE3 drafter)."""
    root = Path(root)
    target, drafter = root / f"target_{kind}", root / f"drafter_{kind}"
    if kind == "random":
        config = write_target(target)
        write_drafter(drafter, config, target)
    elif kind == "k_eq_v":
        config = write_target(target, k_eq_v=True)
        write_drafter(drafter, config, target)
    elif kind == "copy":
        config = write_target(target, post_norm_scale=1.0)
        write_copy_drafter(drafter, config, target)
    elif kind == "eagle3":
        config = write_target(target)
        write_eagle3_drafter(drafter, config, target)
    else:
        raise ValueError(f"kind must be 'random', 'copy', 'k_eq_v' or 'eagle3', got {kind!r}.")
    return target, drafter
