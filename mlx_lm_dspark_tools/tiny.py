"""Tiny random checkpoints (targets with a tokenizer, drafters in every layout), built offline.

Targets are real mlx-lm models (Qwen3, Gemma-4 in its three config flavours)
saved with mlx-lm's own helpers, so ``mlx_lm.load(path)`` and the
``mlx_lm.generate --model PATH`` console script treat them like downloaded
checkpoints.  Drafters are random DSpark / DFlash networks written in the
three on-disk layouts the package must recognise.

Conventions shared by every checkpoint here:

- The tokenizer is a Hugging Face fast WordPiece tokenizer whose vocabulary
  fills exactly ``vocab_size`` ids, so every id the model can emit decodes to
  readable text.  ``<pad>`` = 0, ``<eos>`` = 1 (``EOS_ID``), ``<unk>`` = 2,
  no BOS, no chat template.
- The output-embedding row of ``<eos>`` (``lm_head``, or the shared
  embedding of a tied model) is zeroed, so its logit is exactly 0 and greedy
  decoding never picks it: plain generations always run to ``max_tokens``,
  which keeps token counts in tests predictable.  Tests that need an EOS
  pass their own ``eos_token_ids``.
- Targets are saved in mlx-lm's own naming (what ``mlx_lm.convert`` writes,
  e.g. ``language_model.model.*`` for the Gemma-4 wrapper); drafters in the
  released, unprefixed DeepSpec naming.
"""

import contextlib
import io
import json
import math
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")

# Common lowercase English words (the ones in the tests' prompts first), used
# after the letters and suffixes until the vocabulary is full.  Letters and
# WordPiece continuations guarantee that any lowercase word encodes.
COMMON_WORDS = """
the quick brown fox jumps over lazy dog and cat sat on mat ran to park
of and to in is it you that he was for on are with as his they be at one
have this from or had by hot word but what some we can out other were all there
when up use your how said an each she which do their time if will way about many
then them write would like so these her long make thing see him two has look more
day could go come did number sound no most people my over know water than call
first who may down side been now find any new work part take get place made live
where after back little only round man year came show every good me give our under
name very through just form sentence great think say help low line differ turn cause
much mean before move right boy old too same tell does set three want air well also
play small end put home read hand port large spell add even land here must big high
such follow act why ask men change went light kind off need house picture try us
again animal point mother world near build self earth father head stand own page
should country found answer school grow study still learn plant cover food sun four
between state keep eye never last let thought city tree cross farm hard start might
story saw far sea draw left late run while press close night real life few north
open seem together next white children begin got walk example ease paper group always
music those both mark often letter until mile river car feet care second book carry
took science eat room friend began idea fish mountain stop once base hear horse cut
sure watch color face wood main enough plain girl usual young ready above ever red
list though feel talk bird soon body dog family direct pose leave song measure door
product black short numeral class wind question happen complete ship area half rock
order fire south problem piece told knew pass since top whole king space heard best
hour better true during hundred five remember step early hold west ground interest
reach fast verb sing listen six table travel less morning ten simple several vowel
toward war lay against pattern slow center love person money serve appear road map
rain rule govern pull cold notice voice unit power town fine certain fly fall lead
cry dark machine note wait plan figure star box noun field rest correct able pound
done beauty drive stood contain front teach week final gave green oh quick develop
ocean warm free minute strong special mind behind clear tail produce fact street inch
multiply nothing course stay wheel full force blue object decide surface deep moon
island foot system busy test record boat common gold possible plane stead dry wonder
laugh thousand ago ran check game shape equate miss brought heat snow tire bring yes
distant fill east paint language among
""".split()

SUFFIXES = ("s", "es", "ed", "ing", "er", "est", "ly", "ness", "ment", "tion", "ful", "less")
PUNCTUATION = tuple(".,!?;:'\"-()")


def _filler_syllables():
    """Made-up syllables: enough distinct tokens for any vocab size."""
    consonants, vowels = "bcdfghjklmnprstvwz", "aeiou"
    for c in consonants:
        for v in vowels:
            yield c + v
            yield "##" + c + v
    for c in consonants:
        for v in vowels:
            for d in consonants:
                yield c + v + d
                yield "##" + c + v + d
    n = 0
    while True:  # unbounded, so any vocab_size can be filled
        yield f"w{n}"
        n += 1


def _vocabulary(vocab_size):
    """Token -> id for exactly ``vocab_size`` ids, specials first."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    required = [*SPECIAL_TOKENS, *PUNCTUATION, *"0123456789", *letters, *("##" + c for c in letters)]
    if vocab_size < len(required):
        raise ValueError(f"vocab_size must be at least {len(required)} to cover every lowercase word")
    vocab = {}
    pools = (required, ("##" + s for s in SUFFIXES), COMMON_WORDS, _filler_syllables())
    for pool in pools:
        for token in pool:
            if len(vocab) == vocab_size:
                return vocab
            vocab.setdefault(token, len(vocab))
    raise AssertionError("unreachable: the filler pool is unbounded")


def write_tokenizer(path, vocab_size=512) -> None:
    """Save a fast WordPiece tokenizer mlx-lm loads offline.

    WordPiece (rather than word-level) so unknown lowercase words split into
    known pieces instead of collapsing to ``<unk>``; the WordPiece decoder
    joins words with spaces, so streamed CLI output is readable text.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordPiece(_vocabulary(vocab_size), unk_token="<unk>", max_input_chars_per_word=100))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=False,
    )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(path))


# ---------------------------------------------------------------- random init


def _is_norm(name):
    """RMSNorm scales (``*norm.weight``) must start near 1, not near 0."""
    parts = name.split(".")
    return len(parts) >= 2 and "norm" in parts[-2]


def _random_value(name, shape, *, hidden_size, gain=1.0, post_norm_scale=1.0):
    """One random parameter with a scale that keeps activations O(1).

    Norm weights sit near 1, the Gemma layer scalar is exactly 1, embeddings
    have unit-norm rows and every projection has std gain/sqrt(fan_in).
    """
    if name.endswith("layer_scalar"):
        return mx.ones(shape)
    if _is_norm(name):
        scale = post_norm_scale if name.endswith(GEMMA_POST_NORMS) else 1.0
        return scale * (1.0 + 0.1 * mx.random.normal(shape))
    if name.endswith("bias"):
        return 0.1 * mx.random.normal(shape)
    if "embed_tokens" in name:
        return mx.random.normal(shape) * hidden_size**-0.5
    return mx.random.normal(shape) * (gain / math.sqrt(shape[-1]))


# Gemma normalises each block's output; scaling these norms is how its blocks
# are made to outweigh the (tied) input embedding in the residual stream.
GEMMA_POST_NORMS = ("post_attention_layernorm.weight", "post_feedforward_layernorm.weight")

# Chosen by measuring 40-token greedy runs over several seeds and prompts: at
# unit scale Qwen3 falls into short loops and a tied Gemma keeps copying its
# input token (its residual stream is mostly the input embedding); with these
# the runs hold ~30-38 distinct tokens out of 40.
QWEN3_GAIN = 3.0
GEMMA4_POST_NORM_SCALE = 4.0


def _randomize(model, seed, hidden_size, gain=1.0, post_norm_scale=1.0):
    """Replace every parameter with seeded random values (name order)."""
    mx.random.seed(seed)
    params = sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0])
    new = [(n, _random_value(n, p.shape, hidden_size=hidden_size, gain=gain,
                             post_norm_scale=post_norm_scale).astype(p.dtype)) for n, p in params]
    model.update(tree_unflatten(new))
    mx.eval(model.parameters())


def _silence_eos(model, text_model, tied):
    """Zero the output row of ``<eos>`` so greedy decoding never ends early."""
    head = text_model.model.embed_tokens if tied else text_model.lm_head
    head.weight = head.weight.at[EOS_ID].multiply(0.0)
    mx.eval(model.parameters())


def _maybe_quantize(model, config, bits, group_size):
    """Quantize with mlx-lm's own helper, which records "quantization" in the config."""
    from mlx_lm.utils import quantize_model

    if bits is None:
        return model, config
    with contextlib.redirect_stdout(io.StringIO()):  # quiet its "[INFO] Quantized ..." line
        return quantize_model(model, config, group_size, bits)


def readable_config(config) -> dict:
    """``config`` with a flat transformers-5 ``rope_parameters`` also given as
    a top-level ``rope_theta``, the only place mlx-lm < 0.32 reads it."""
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope and "rope_theta" not in config:
        return {**config, "rope_theta": rope["rope_theta"]}
    return dict(config)


def save_target(path, model, config) -> dict:
    """Save a target the way mlx_lm.convert does, plus the tiny tokenizer."""
    from mlx_lm.utils import save_config, save_model

    path = Path(path)
    save_model(path, model)
    save_config(readable_config(config), path / "config.json")
    write_tokenizer(path, text_config_of(config)["vocab_size"])
    return config


# ---------------------------------------------------------------- targets


def qwen3_config(*, vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, head_dim,
                 intermediate_size, tie_word_embeddings):
    """A transformers-5 style Qwen3ForCausalLM config (like e2e_bigram/target)."""
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": None,
        "dtype": "float32",
        "eos_token_id": EOS_ID,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": intermediate_size,
        "layer_types": ["full_attention"] * num_layers,
        "max_position_embeddings": 4096,
        "max_window_layers": 28,
        "model_type": "qwen3",
        "num_attention_heads": num_heads,
        "num_hidden_layers": num_layers,
        "num_key_value_heads": num_kv_heads,
        "pad_token_id": PAD_ID,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
        "sliding_window": None,
        "tie_word_embeddings": tie_word_embeddings,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab_size,
    }


def make_qwen3_target(*, vocab_size=512, hidden_size=64, num_layers=8, num_heads=4, num_kv_heads=2,
                      head_dim=16, intermediate_size=128, tie_word_embeddings=False, seed=0, bits=None,
                      group_size=64):
    """A random (optionally quantized) Qwen3 model in memory, with its config."""
    from mlx_lm.models import qwen3

    config = qwen3_config(vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers,
                          num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                          intermediate_size=intermediate_size, tie_word_embeddings=tie_word_embeddings)
    model = qwen3.Model(qwen3.ModelArgs.from_dict(readable_config(config)))
    _randomize(model, seed, hidden_size, gain=QWEN3_GAIN)
    _silence_eos(model, model, tie_word_embeddings)
    return _maybe_quantize(model, config, bits, group_size)


def save_qwen3_target(path, *, vocab_size=512, hidden_size=64, num_layers=8, num_heads=4, num_kv_heads=2,
                      head_dim=16, intermediate_size=128, tie_word_embeddings=False, seed=0, bits=None,
                      group_size=64) -> dict:
    """Write a random Qwen3 target (config, weights, tokenizer); return its config."""
    kw = dict(locals())
    del kw["path"]
    return save_target(path, *make_qwen3_target(**kw))


def gemma4_layer_types(num_layers, sliding_window_pattern):
    """Gemma's repeating pattern: (pattern - 1) sliding layers, then one full."""
    pattern = ["sliding_attention"] * (sliding_window_pattern - 1) + ["full_attention"]
    return [pattern[i % len(pattern)] for i in range(num_layers)]


def gemma4_text_config(*, vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, head_dim,
                       global_head_dim, intermediate_size, sliding_window, layer_types, num_kv_shared_layers,
                       attention_k_eq_v, hidden_size_per_layer_input, tie_word_embeddings, num_experts=None):
    """A transformers-5 style gemma4_text config (fields as in the fixtures);
    with ``num_experts`` the MoE variant (2 experts per token beside the
    dense MLP, as Gemma-4 26B-A4B)."""
    return {
        "architectures": ["Gemma4ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attention_k_eq_v": attention_k_eq_v,
        "bos_token_id": None,
        "dtype": "float32",
        "enable_moe_block": bool(num_experts),
        "eos_token_id": EOS_ID,
        "final_logit_softcapping": 30.0,
        "global_head_dim": global_head_dim,
        "head_dim": head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": hidden_size,
        "hidden_size_per_layer_input": hidden_size_per_layer_input,
        "initializer_range": 0.02,
        "intermediate_size": intermediate_size,
        "layer_types": list(layer_types),
        "max_position_embeddings": 4096,
        "model_type": "gemma4_text",
        "moe_intermediate_size": 32 if num_experts else None,
        "num_attention_heads": num_heads,
        "num_experts": num_experts,
        "num_global_key_value_heads": 1,
        "num_hidden_layers": num_layers,
        "num_key_value_heads": num_kv_heads,
        "num_kv_shared_layers": num_kv_shared_layers,
        "pad_token_id": PAD_ID,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {
            "full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0,
                               "rope_type": "proportional"},
            "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
        },
        "sliding_window": sliding_window,
        "tie_word_embeddings": tie_word_embeddings,
        "top_k_experts": 2 if num_experts else None,
        "use_bidirectional_attention": None,
        "use_cache": True,
        "use_double_wide_mlp": False,
        "vocab_size": vocab_size,
        "vocab_size_per_layer_input": vocab_size,
    }


def gemma4_wrap(text_config, model_type="gemma4"):
    """The multimodal-style wrapper config mlx-lm's gemma4 module reads.

    ``vocab_size`` must also sit at the top level: mlx-lm's gemma4.ModelArgs
    copies its own (default 262144) over the text config's.
    """
    arch = "Gemma4UnifiedForConditionalGeneration" if model_type == "gemma4_unified" else "Gemma4ForConditionalGeneration"
    return {
        "architectures": [arch],
        "model_type": model_type,
        "text_config": {k: v for k, v in text_config.items() if k != "architectures"},
        "vocab_size": text_config["vocab_size"],
        "eos_token_id": text_config["eos_token_id"],
        "pad_token_id": text_config["pad_token_id"],
        "tie_word_embeddings": text_config["tie_word_embeddings"],
        "dtype": "float32",
    }


GEMMA4_MODEL_TYPES = ("gemma4", "gemma4_text", "gemma4_unified")


def make_gemma4_target(*, model_type="gemma4", vocab_size=512, hidden_size=64, num_layers=8,
                       num_heads=4, num_kv_heads=2, head_dim=16, global_head_dim=32, intermediate_size=128,
                       sliding_window=8, sliding_window_pattern=4, layer_types=None, num_kv_shared_layers=2,
                       attention_k_eq_v=False, hidden_size_per_layer_input=0, tie_word_embeddings=True,
                       num_experts=None, seed=0, bits=None, group_size=64):
    """A random (optionally quantized) Gemma-4 model in memory, with its config.

    ``model_type`` picks the config flavour: "gemma4" (wrapper with
    ``text_config``), "gemma4_text" (flat) or "gemma4_unified" (wrapper that
    mlx-lm remaps onto its gemma4 module).  Defaults give a sliding window
    shorter than a 40-token generation and two KV-shared layers.
    """
    from mlx_lm.models import gemma4, gemma4_text

    if model_type not in GEMMA4_MODEL_TYPES:
        raise ValueError(f"model_type must be one of {GEMMA4_MODEL_TYPES}")
    types = list(layer_types) if layer_types else gemma4_layer_types(num_layers, sliding_window_pattern)
    text = gemma4_text_config(vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers,
                              num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                              global_head_dim=global_head_dim, intermediate_size=intermediate_size,
                              sliding_window=sliding_window, layer_types=types,
                              num_kv_shared_layers=num_kv_shared_layers, attention_k_eq_v=attention_k_eq_v,
                              hidden_size_per_layer_input=hidden_size_per_layer_input,
                              tie_word_embeddings=tie_word_embeddings, num_experts=num_experts)
    if model_type == "gemma4_text":
        config = text
        model = gemma4_text.Model(gemma4_text.ModelArgs.from_dict(config))
        text_model = model
    else:
        config = gemma4_wrap(text, model_type)
        model = gemma4.Model(gemma4.ModelArgs.from_dict(config))
        text_model = model.language_model
    _randomize(model, seed, hidden_size, post_norm_scale=GEMMA4_POST_NORM_SCALE)
    _silence_eos(model, text_model, tie_word_embeddings)
    return _maybe_quantize(model, config, bits, group_size)


def save_gemma4_target(path, *, model_type="gemma4", vocab_size=512, hidden_size=64, num_layers=8,
                       num_heads=4, num_kv_heads=2, head_dim=16, global_head_dim=32, intermediate_size=128,
                       sliding_window=8, sliding_window_pattern=4, layer_types=None, num_kv_shared_layers=2,
                       attention_k_eq_v=False, hidden_size_per_layer_input=0, tie_word_embeddings=True,
                       num_experts=None, seed=0, bits=None, group_size=64) -> dict:
    """Write a random Gemma-4 target (config, weights, tokenizer); return its config."""
    kw = dict(locals())
    del kw["path"]
    return save_target(path, *make_gemma4_target(**kw))


def text_config_of(config):
    """The text-model part of a target config (the wrapper's text_config)."""
    return config.get("text_config", config)


# ---------------------------------------------------------------- other attention targets

DECODER_MODEL_TYPES = ("llama", "qwen2", "qwen3_moe", "gpt_oss")


def _common_config(model_type, vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, head_dim,
                   intermediate_size, tie_word_embeddings) -> dict:
    """The fields every tiny non-Gemma target's config has: its drafter is a
    Qwen3-style network of the target's width, which reads them."""
    return {
        "model_type": model_type,
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "intermediate_size": intermediate_size,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": tie_word_embeddings,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
    }


def decoder_config(model_type, *, vocab_size=512, hidden_size=64, num_layers=8, num_heads=4, num_kv_heads=2,
                   head_dim=16, intermediate_size=128, sliding_window=8, tie_word_embeddings=False):
    """A flat config of one of mlx-lm's attention decoders: Llama, Qwen2,
    Qwen3-MoE (4 experts, 2 per token) or gpt-oss (4 experts, attention
    sinks, sliding and full layers alternating, the sliding window shorter
    than a 40-token generation).  Their drafters are Qwen3-style networks
    of the target's width, so the Qwen3 attention fields are in every one."""
    config = _common_config(model_type, vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, head_dim,
                            intermediate_size, tie_word_embeddings)
    config["rope_theta"] = 10000.0
    if model_type == "qwen2":
        config["head_dim"] = hidden_size // num_heads  # Qwen2 derives it; the drafter must agree
    elif model_type == "qwen3_moe":
        config.update({"num_experts": 4, "num_experts_per_tok": 2, "decoder_sparse_step": 1, "mlp_only_layers": [],
                       "moe_intermediate_size": 32, "norm_topk_prob": True})
    elif model_type == "gpt_oss":
        config.update({
            "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": sliding_window,
            "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)],
        })
        config.pop("tie_word_embeddings")  # gpt-oss always has its own head
    elif model_type != "llama":
        raise ValueError(f"unknown decoder model_type {model_type!r} (one of {DECODER_MODEL_TYPES})")
    return config


def make_decoder_target(model_type, *, seed=0, bits=None, group_size=64, overrides=None, **kw):
    """A random (optionally quantized) mlx-lm attention decoder in memory, with
    its config (``overrides``: config fields set after ``decoder_config``)."""
    import importlib

    config = {**decoder_config(model_type, **kw), **(overrides or {})}
    module = importlib.import_module(f"mlx_lm.models.{model_type}")
    model = module.Model(module.ModelArgs.from_dict(config))
    _randomize(model, seed, config["hidden_size"], gain=QWEN3_GAIN)
    _silence_eos(model, model, config.get("tie_word_embeddings", False))
    return _maybe_quantize(model, config, bits, group_size)


def save_decoder_target(path, model_type, **kw) -> dict:
    """Write a random attention decoder target (config, weights, tokenizer); return its config."""
    return save_target(path, *make_decoder_target(model_type, **kw))


# ---------------------------------------------------------------- hybrid recurrent targets

HYBRID_MODEL_TYPES = ("qwen3_5", "qwen3_5_moe", "qwen3_next", "lfm2", "nemotron_h")


def hybrid_config(model_type, *, vocab_size=512, hidden_size=64, num_layers=8, num_heads=4, num_kv_heads=2,
                  head_dim=16, intermediate_size=128, tie_word_embeddings=False):
    """A flat config of one of mlx-lm's hybrid recurrent models (attention
    every fourth layer for the Qwen families, at layers 2 and 5 for LFM2,
    the Mamba/attention/MLP pattern ``M*M-`` repeated for Nemotron-H).

    The Qwen3 attention fields (``rms_norm_eps``, ``head_dim``, ...) are
    present in every flavour: the drafter of a hybrid target is a Qwen3-style
    network of the target's width.  LFM2's embedding is always tied."""
    config = _common_config(model_type, vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, head_dim,
                            intermediate_size, tie_word_embeddings)
    config["attention_bias"] = False
    if model_type in ("qwen3_5", "qwen3_5_moe", "qwen3_next"):
        config.update({
            "linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 16,
            "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4, "full_attention_interval": 4,
            "rope_theta": 100000.0, "partial_rotary_factor": 0.25,
        })
        if model_type == "qwen3_5":
            config["rope_parameters"] = {"type": "default", "rope_theta": 100000.0, "partial_rotary_factor": 0.25}
        else:
            config.update({"num_experts": 4, "num_experts_per_tok": 2, "decoder_sparse_step": 1,
                           "shared_expert_intermediate_size": 64, "moe_intermediate_size": 32,
                           "mlp_only_layers": [], "norm_topk_prob": True})
            if model_type == "qwen3_5_moe":
                config["rope_parameters"] = {"type": "default", "rope_theta": 100000.0,
                                             "partial_rotary_factor": 0.25}
    elif model_type == "lfm2":
        attention = {2, 5}
        config.update({
            "norm_eps": 1e-5, "conv_bias": False, "conv_L_cache": 3, "block_dim": hidden_size,
            "block_ff_dim": intermediate_size, "block_multiple_of": 16, "block_ffn_dim_multiplier": 1.0,
            "block_auto_adjust_ff_dim": False, "rope_theta": 1000000.0,
            "tie_word_embeddings": True,  # LFM2 always reads out through its embedding
            "layer_types": ["full_attention" if i in attention else "conv" for i in range(num_layers)],
        })
    elif model_type == "nemotron_h":
        pattern = ("M*M-" * num_layers)[:num_layers]
        config.update({
            "hybrid_override_pattern": list(pattern), "mamba_num_heads": 4, "mamba_head_dim": 16,
            "mamba_proj_bias": False, "ssm_state_size": 16, "conv_kernel": 4, "n_groups": 1, "mlp_bias": False,
            "layer_norm_epsilon": 1e-5, "use_bias": False, "use_conv_bias": True, "rope_theta": 10000.0,
        })
    else:
        raise ValueError(f"unknown hybrid model_type {model_type!r} (one of {HYBRID_MODEL_TYPES})")
    return config


def make_hybrid_target(model_type, *, seed=0, bits=None, group_size=64, overrides=None, **kw):
    """A random (optionally quantized) hybrid recurrent mlx-lm model in memory,
    with its config (``overrides``: config fields set after ``hybrid_config``)."""
    import importlib

    config = {**hybrid_config(model_type, **kw), **(overrides or {})}
    module = importlib.import_module(f"mlx_lm.models.{model_type}")
    model = module.Model(module.ModelArgs.from_dict(config))
    text_model = getattr(model, "language_model", model)
    _randomize(model, seed, config["hidden_size"], gain=QWEN3_GAIN)
    _silence_eos(model, text_model, config["tie_word_embeddings"])
    return _maybe_quantize(model, config, bits, group_size)


def save_hybrid_target(path, model_type, **kw) -> dict:
    """Write a random hybrid recurrent target (config, weights, tokenizer); return its config."""
    return save_target(path, *make_hybrid_target(model_type, **kw))


# ---------------------------------------------------------------- drafters

DRAFTER_LAYOUTS = ("deepspec", "dflash_config", "zlab")


def _family_of(target_config):
    """Which drafter layer variant a target needs."""
    return "gemma4" if text_config_of(target_config)["model_type"].startswith("gemma4") else "qwen3"


def _drafter_config(target_config, *, layout, markov_rank, block_size, target_layer_ids, num_drafter_layers,
                    mask_token_id, confidence_head, sliding_window=None):
    """The drafter config: the target's text config, extended per layout."""
    family = "qwen3" if layout == "zlab" else _family_of(target_config)
    text = text_config_of(target_config)
    config = {k: v for k, v in text.items() if k not in ("quantization", "quantization_config")}
    config.update({
        "architectures": ["Qwen3DSparkModel" if family == "qwen3" else "Gemma4DSparkModel"],
        "model_type": "qwen3" if family == "qwen3" else "gemma4_text",
        "num_hidden_layers": num_drafter_layers,
        "layer_types": ["full_attention"] * num_drafter_layers,
        "tie_word_embeddings": False,
        "num_anchors": 4,
    })
    if sliding_window is not None:  # z-lab Qwen3.6 style: sliding layers, the last one full
        config["layer_types"] = ["sliding_attention"] * (num_drafter_layers - 1) + ["full_attention"]
        config["sliding_window"] = sliding_window
    if family == "gemma4":
        config.update({"num_kv_shared_layers": 0, "target_model_type": target_config["model_type"],
                       "target_text_model_type": "gemma4_text"})
    fields = {
        "num_target_layers": text["num_hidden_layers"],
        "block_size": block_size,
        "mask_token_id": mask_token_id,
        "target_layer_ids": list(target_layer_ids),
        "markov_rank": markov_rank,
        "enable_confidence_head": confidence_head,
    }
    if markov_rank > 0:
        fields["markov_head_type"] = "vanilla"
    if confidence_head and markov_rank > 0:
        fields["confidence_head_with_markov"] = True

    if layout == "deepspec":
        config.update(fields)
    elif layout == "dflash_config":
        config["dflash_config"] = fields
    else:  # zlab: older transformers style, only taps and mask id nested
        rope = config.pop("rope_parameters", None) or {}
        nested = {"target_layer_ids": list(target_layer_ids), "mask_token_id": mask_token_id}
        if _family_of(target_config) == "gemma4":
            # A Qwen3-style backbone reading Gemma-4's embedding: the config
            # names no embedding scale (binding takes the target's, as z-lab's
            # reference does); the soft-cap comes with the copied text config.
            for key in ("global_head_dim", "num_global_key_value_heads", "attention_k_eq_v"):
                config.pop(key, None)
        config.update({
            "architectures": ["DFlashDraftModel"],
            "auto_map": {"AutoModel": "dflash.DFlashDraftModel"},
            "rope_theta": text.get("rope_theta") or rope.get("rope_theta") or 1000000.0,
            "rope_scaling": None,
            "block_size": block_size,
            "num_target_layers": text["num_hidden_layers"],
            "dflash_config": nested,
        })
        config.pop("num_anchors")
    return dict(sorted(config.items()))


def _layer_shapes(config, family):
    """Parameter shapes of one drafter layer (all drafter layers are full attention)."""
    H, I = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv_heads = config["num_key_value_heads"]
    head_dim = config["head_dim"]
    k_eq_v = False
    if family == "gemma4":
        head_dim = config.get("global_head_dim") or head_dim
        k_eq_v = bool(config.get("attention_k_eq_v"))
        if k_eq_v and config.get("num_global_key_value_heads") is not None:
            kv_heads = config["num_global_key_value_heads"]
    shapes = {
        "self_attn.q_proj.weight": (heads * head_dim, H),
        "self_attn.k_proj.weight": (kv_heads * head_dim, H),
        "self_attn.v_proj.weight": (kv_heads * head_dim, H),
        "self_attn.o_proj.weight": (H, heads * head_dim),
        "self_attn.q_norm.weight": (head_dim,),
        "self_attn.k_norm.weight": (head_dim,),
        "mlp.gate_proj.weight": (I, H),
        "mlp.up_proj.weight": (I, H),
        "mlp.down_proj.weight": (H, I),
        "input_layernorm.weight": (H,),
        "post_attention_layernorm.weight": (H,),
    }
    if family == "gemma4":
        shapes.update({"pre_feedforward_layernorm.weight": (H,), "post_feedforward_layernorm.weight": (H,),
                       "layer_scalar": (1,)})
        if k_eq_v:
            del shapes["self_attn.v_proj.weight"]
    return shapes


def _drafter_shapes(config, family, *, n_taps, markov_rank, confidence_head, with_embeddings):
    """Every drafter weight name -> shape, in the released (unprefixed) naming."""
    H, V = config["hidden_size"], config["vocab_size"]
    shapes = {"fc.weight": (H, n_taps * H), "hidden_norm.weight": (H,), "norm.weight": (H,)}
    if with_embeddings:
        shapes.update({"embed_tokens.weight": (V, H), "lm_head.weight": (V, H)})
    if markov_rank > 0:
        shapes.update({"markov_head.markov_w1.weight": (V, markov_rank),
                       "markov_head.markov_w2.weight": (V, markov_rank)})
    if confidence_head:
        shapes.update({"confidence_head.proj.weight": (1, H + markov_rank), "confidence_head.proj.bias": (1,)})
    for i in range(config["num_hidden_layers"]):
        for name, shape in _layer_shapes(config, family).items():
            shapes[f"layers.{i}.{name}"] = shape
    return shapes


def _target_embeddings(target_weights, hidden_size) -> dict:
    """The drafter's embedding and LM head copied from its target (a tied
    target lends its embedding as the head; Nemotron-H keeps its embedding
    at ``backbone.embeddings``)."""
    embed = _target_matrix(target_weights, "embed_tokens.weight", hidden_size)
    if embed is None:
        embed = _target_matrix(target_weights, ".embeddings.weight", hidden_size)
    head = _target_matrix(target_weights, "lm_head.weight", hidden_size)
    return {"embed_tokens.weight": embed, "lm_head.weight": embed if head is None else head}


def _write_drafter(path, weights: dict, config: dict) -> dict:
    """Write a drafter checkpoint (``model.safetensors`` + ``config.json``); returns ``config``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return config


def _target_matrix(target_weights, suffix, hidden_size):
    """A target's float embedding / head matrix, dequantized when packed.

    Quantization settings are recovered from the packed shapes, so per-layer
    overrides in the target's config need no special handling.
    """
    names = [k for k in target_weights if k.endswith(suffix) and "per_layer" not in k]
    if not names:
        return None
    name = names[0]
    w = target_weights[name]
    prefix = name[: -len(".weight")]
    scales = target_weights.get(prefix + ".scales")
    if scales is None:
        return w.astype(mx.float32)
    group_size = hidden_size // scales.shape[-1]
    bits = w.shape[-1] * 32 // hidden_size
    return mx.dequantize(w, scales, target_weights.get(prefix + ".biases"), group_size=group_size,
                         bits=bits).astype(mx.float32)


def save_drafter(path, target_config: dict, *, layout="deepspec", markov_rank=16, block_size=None,
                 target_layer_ids=(1, 3, 5), num_drafter_layers=2, mask_token_id=None, confidence_head=None,
                 seed=0, target_weights=None, sliding_window=None) -> dict:
    """Write a random drafter for ``target_config`` in ``layout``; return its config.

    With ``sliding_window`` every drafter layer but the last is a
    sliding-window layer (z-lab's Qwen3.6 drafters; in the zlab layout they
    attend causally inside the block).  The zlab layout is a Qwen3-style
    network for any target, Gemma-4's included.

    ``block_size`` defaults to 7 (16 for "zlab"); ``mask_token_id`` to
    vocab_size - 12 (500 for vocab 512, as in the fixtures);
    ``confidence_head`` to "on for DSpark (markov_rank > 0), off for DFlash".
    embed_tokens / lm_head are the target's own matrices when
    ``target_weights`` (``mx.load`` of the target) is given, dequantized to
    float32 for quantized targets (a tied target's embedding serves as both);
    without it they are fresh random matrices.  The zlab layout stores
    neither (z-lab drafters borrow the target's) and has no Markov or
    confidence head, whatever ``markov_rank`` / ``confidence_head`` say.
    """
    if layout not in DRAFTER_LAYOUTS:
        raise ValueError(f"layout must be one of {DRAFTER_LAYOUTS}")
    family = "qwen3" if layout == "zlab" else _family_of(target_config)
    text = text_config_of(target_config)
    if layout == "zlab":
        markov_rank, confidence_head = 0, False
    if confidence_head is None:
        confidence_head = markov_rank > 0
    if block_size is None:
        block_size = 16 if layout == "zlab" else 7
    if mask_token_id is None:
        mask_token_id = text["vocab_size"] - 12
    if not 0 <= mask_token_id < text["vocab_size"]:
        raise ValueError("mask_token_id must be a valid id of the target vocabulary")
    if any(not -1 <= i < text["num_hidden_layers"] for i in target_layer_ids):
        raise ValueError("target_layer_ids must index the target's layers")

    config = _drafter_config(target_config, layout=layout, markov_rank=markov_rank, block_size=block_size,
                             target_layer_ids=target_layer_ids, num_drafter_layers=num_drafter_layers,
                             mask_token_id=mask_token_id, confidence_head=confidence_head,
                             sliding_window=sliding_window)
    shapes = _drafter_shapes(config, family, n_taps=len(target_layer_ids), markov_rank=markov_rank,
                             confidence_head=confidence_head, with_embeddings=layout != "zlab")
    H = config["hidden_size"]
    mx.random.seed(seed)
    weights = {}
    for name in sorted(shapes):
        if name.startswith("markov_head"):  # rank-r factors: std 1/sqrt(r) as in the fixtures
            weights[name] = mx.random.normal(shapes[name]) * markov_rank**-0.5
        else:
            weights[name] = _random_value(name, shapes[name], hidden_size=H)
    if target_weights is not None and layout != "zlab":
        weights.update(_target_embeddings(target_weights, H))
    return _write_drafter(path, weights, config)


# ---------------------------------------------------------------- pairs

_DRAFTER_KEYS = ("markov_rank", "block_size", "target_layer_ids", "num_drafter_layers", "mask_token_id",
                 "confidence_head", "drafter_seed", "drafter_sliding_window")


def build_pair(tmp_path, family="qwen3", layout="deepspec", bits=None, **kw):
    """Write a target and a matching drafter under ``tmp_path``; return both dirs.

    ``family`` is "qwen3", a Gemma-4 model_type ("gemma4", "gemma4_text",
    "gemma4_unified"; ``num_experts=4`` gives its MoE variant), one of
    ``DECODER_MODEL_TYPES`` or one of ``HYBRID_MODEL_TYPES``.  Keyword arguments named like save_drafter's go to the
    drafter (``drafter_seed`` becomes its ``seed``, ``drafter_sliding_window``
    its ``sliding_window``); the rest go to the
    target.  The drafter copies the target's embedding and head.
    """
    root = Path(tmp_path)
    target_dir, drafter_dir = root / "target", root / "drafter"
    drafter_kw = {k: kw.pop(k) for k in _DRAFTER_KEYS if k in kw}
    if "drafter_seed" in drafter_kw:
        drafter_kw["seed"] = drafter_kw.pop("drafter_seed")
    if "drafter_sliding_window" in drafter_kw:
        drafter_kw["sliding_window"] = drafter_kw.pop("drafter_sliding_window")
    if family == "qwen3":
        config = save_qwen3_target(target_dir, bits=bits, **kw)
    elif family in GEMMA4_MODEL_TYPES:
        config = save_gemma4_target(target_dir, model_type=family, bits=bits, **kw)
    elif family in HYBRID_MODEL_TYPES:
        config = save_hybrid_target(target_dir, family, bits=bits, **kw)
    elif family in DECODER_MODEL_TYPES:
        config = save_decoder_target(target_dir, family, bits=bits, **kw)
    else:
        raise ValueError(f"unknown family {family!r}")
    target_weights = mx.load(str(target_dir / "model.safetensors"))
    save_drafter(drafter_dir, config, layout=layout, target_weights=target_weights, **drafter_kw)
    return target_dir, drafter_dir


# ---------------------------------------------------------------- EAGLE3 drafters and speculators layouts


def _eagle3_config(target_config, *, ttt_length, target_layer_ids):
    """DeepSpec's EAGLE3 config: the target's text config with the drafter fields."""
    family = _family_of(target_config)
    text = text_config_of(target_config)
    config = {k: v for k, v in text.items() if k not in ("quantization", "quantization_config")}
    config.update({
        "architectures": ["Qwen3Eagle3Model" if family == "qwen3" else "Gemma4Eagle3Model"],
        "model_type": "qwen3" if family == "qwen3" else "gemma4_text",
        "num_hidden_layers": 1,
        "draft_num_hidden_layers": 1,
        "layer_types": ["full_attention"],
        "num_target_layers": text["num_hidden_layers"],
        "target_layer_ids": list(target_layer_ids),
        "ttt_length": ttt_length,
        "step_loss_decay": 0.8,
        "tie_word_embeddings": False,
    })
    if family == "gemma4":
        config.update({"num_kv_shared_layers": 0, "enable_moe_block": False, "hidden_size_per_layer_input": 0,
                       "target_model_type": target_config["model_type"], "target_text_model_type": "gemma4_text"})
    return dict(sorted(config.items()))


def save_eagle3_drafter(path, target_config: dict, *, ttt_length=5, target_layer_ids=(1, 2, 4, 5, 6), seed=0,
                        target_weights=None) -> dict:
    """Write a random DeepSpec-layout EAGLE3 drafter for ``target_config``;
    return its config.  embed_tokens / lm_head are the target's when
    ``target_weights`` is given (as DeepSpec's trainer copies them)."""
    from mlx_lm_dspark.eagle3 import Eagle3Drafter, ModelArgs, eagle3_args

    text = text_config_of(target_config)
    if any(not -1 <= i < text["num_hidden_layers"] for i in target_layer_ids):
        raise ValueError("target_layer_ids must index the target's layers")
    config = _eagle3_config(target_config, ttt_length=ttt_length, target_layer_ids=target_layer_ids)
    drafter = Eagle3Drafter(ModelArgs.from_dict(eagle3_args(config)))
    H = config["hidden_size"]
    mx.random.seed(seed)
    weights = {name: _random_value(name, p.shape, hidden_size=H).astype(mx.float32)
               for name, p in sorted(tree_flatten(drafter.parameters()))}
    if target_weights is not None:
        weights.update(_target_embeddings(target_weights, H))
    return _write_drafter(path, weights, config)


def build_eagle3_pair(tmp_path, family="qwen3", bits=None, ttt_length=5, target_layer_ids=(1, 2, 4, 5, 6),
                      drafter_seed=0, **kw):
    """Write a target and a random EAGLE3 drafter for it under ``tmp_path``
    (``family`` as for ``build_pair``; the rest go to the target)."""
    root = Path(tmp_path)
    target_dir, drafter_dir = root / "target", root / "drafter"
    if family == "qwen3":
        config = save_qwen3_target(target_dir, bits=bits, **kw)
    elif family in GEMMA4_MODEL_TYPES:
        config = save_gemma4_target(target_dir, model_type=family, bits=bits, **kw)
    else:
        raise ValueError(f"unknown family {family!r}")
    target_weights = mx.load(str(target_dir / "model.safetensors"))
    save_eagle3_drafter(drafter_dir, config, ttt_length=ttt_length, target_layer_ids=target_layer_ids,
                        seed=drafter_seed, target_weights=target_weights)
    return target_dir, drafter_dir


SPECULATORS_ARCHITECTURES = {"dspark": "DSparkSpeculator", "dflash": "DFlashSpeculator", "eagle3": "Eagle3Speculator"}


def draft_vocabulary(vocab_size: int, draft_vocab_size: int, seed: int = 0) -> list:
    """A sorted random subset of the target ids (a stand-in for speculators'
    most-frequent-tokens choice)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(vocab_size, size=draft_vocab_size, replace=False))


def to_speculators(drafter_dir, out_dir, *, draft_vocab_size=None, seed=0, sample_from_anchor=None,
                   keep=None) -> dict:
    """Rewrite a DeepSpec-layout drafter (DSpark, DFlash or EAGLE3, Qwen3) as
    a vLLM speculators checkpoint; return its config.

    Taps become ``aux_hidden_state_layer_ids`` (layer id = tap + 1: the
    state entering that layer), the network's settings go under
    ``transformer_layer_config`` (as a diff against Qwen3Config's defaults,
    the way speculators saves it), and with ``draft_vocab_size`` the LM
    head (and a DSpark Markov head's output) keep only the rows of a random
    draft vocabulary (or ``keep``, sorted target ids), stored as ``d2t`` /
    ``t2d``.  ``sample_from_anchor`` defaults to speculators' own (DSpark
    true, DFlash false), which for DFlash changes the block alignment."""
    from mlx_lm_dspark.config import QWEN3_DEFAULTS, is_eagle3_config

    drafter_dir, out_dir = Path(drafter_dir), Path(out_dir)
    config = json.loads((drafter_dir / "config.json").read_text())
    weights = mx.load(str(drafter_dir / "model.safetensors"))
    if config.get("model_type") != "qwen3":
        raise ValueError("speculators checkpoints are built for Qwen3 drafters here")
    eagle3 = is_eagle3_config(config)
    kind = "eagle3" if eagle3 else ("dspark" if config.get("markov_rank") else "dflash")
    drafter_fields = ("architectures", "block_size", "mask_token_id", "target_layer_ids", "num_target_layers",
                      "markov_rank", "markov_head_type", "enable_confidence_head", "confidence_head_with_markov",
                      "ttt_length", "step_loss_decay", "draft_num_hidden_layers", "num_anchors",
                      "target_model_name_or_path")
    layer = {k: v for k, v in config.items() if k not in drafter_fields and QWEN3_DEFAULTS.get(k, object()) != v}
    layer["model_type"] = "qwen3"
    V = config["vocab_size"]
    draft_size = draft_vocab_size or V
    proposal = config["ttt_length"] if eagle3 else config["block_size"] - (0 if kind == "dspark" else 1)
    out = {
        "architectures": [SPECULATORS_ARCHITECTURES[kind]],
        "speculators_model_type": kind,
        "speculators_version": "0.3.0",
        "draft_vocab_size": draft_size,
        "transformer_layer_config": layer,
        "speculators_config": {
            "algorithm": kind,
            "default_proposal_method": "greedy",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": proposal,
                                  "verifier_accept_k": 1, "accept_tolerance": 0.0}],
            "verifier": {"name_or_path": "tiny/target", "architectures": ["Qwen3ForCausalLM"]},
        },
    }
    taps = [i + 1 for i in config["target_layer_ids"]]
    if eagle3:
        out.update({"eagle_aux_hidden_state_layer_ids": taps, "norm_before_residual": False,
                    "norm_before_fc": False, "fc_norm": False, "norm_output": False, "target_hidden_size": None})
    else:
        anchor = (kind == "dspark") if sample_from_anchor is None else sample_from_anchor
        out.update({"aux_hidden_state_layer_ids": taps, "block_size": config["block_size"],
                    "mask_token_id": config["mask_token_id"], "sample_from_anchor": anchor,
                    "target_hidden_size": None})
        if kind == "dspark":
            out.update({k: config.get(k) for k in ("markov_rank", "markov_head_type", "enable_confidence_head",
                                                   "confidence_head_with_markov")})
    if draft_size != V:
        ids = list(keep) if keep is not None else draft_vocabulary(V, draft_size, seed)
        if len(ids) != draft_size:
            raise ValueError("keep must list draft_vocab_size target ids")
        rows = mx.array(ids)
        for name in ("lm_head.weight", "markov_head.markov_w2.weight"):
            if name in weights:
                weights[name] = weights[name][rows]
        weights["d2t"] = (rows - mx.arange(draft_size)).astype(mx.int64)
        weights["t2d"] = mx.zeros((V,), mx.int32).at[rows].add(1).astype(mx.bool_)
    out_dir.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(out, indent=2))
    return out


# Shapes for benchmarks: "tiny" as in the tests, "qwen3-0.6b" Qwen3-0.6B's
# shape (random weights, 32k vocabulary) with a released-style drafter.
PRESETS = {
    "tiny": dict(family="qwen3", block_size=7),
    "qwen3-0.6b": dict(
        family="qwen3", vocab_size=32000, hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8,
        head_dim=128, intermediate_size=3072, tie_word_embeddings=True, block_size=7, markov_rank=256,
        target_layer_ids=(1, 7, 13, 19, 25), num_drafter_layers=5,
    ),
}


def main(argv=None) -> None:
    """Write a random target + drafter pair: python -m mlx_lm_dspark_tools.tiny DIR [--preset P] [--bits B]."""
    import argparse

    parser = argparse.ArgumentParser(description="Write a random target and DSpark drafter (offline).")
    parser.add_argument("out", help="Directory for target/ and drafter/.")
    parser.add_argument("--preset", choices=list(PRESETS), default="tiny")
    parser.add_argument("--bits", type=int, default=None, help="Quantize the target (e.g. 4).")
    args = parser.parse_args(argv)
    target, drafter = build_pair(args.out, bits=args.bits, **PRESETS[args.preset])
    print(f"target: {target}\ndrafter: {drafter}")


if __name__ == "__main__":
    main()
