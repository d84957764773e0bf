"""Recognise drafter checkpoints from config.json and normalise their layouts.

Three on-disk layouts carry the same network:
- DeepSpec (DeepSeek's release): ``Qwen3DSparkModel`` / ``Gemma4DSparkModel``
  architectures with the drafter fields at the top level;
- community conversions: the drafter fields nested under ``dflash_config``;
- z-lab DFlash: ``DFlashDraftModel``, fields under ``dflash_config``, no
  embeddings / LM head in the weights (borrowed from the target) and a shifted
  block alignment (slot i predicts its own position);
- vLLM speculators: ``speculators_model_type`` "dspark" / "dflash" / "eagle3",
  the network's settings under ``transformer_layer_config``, taps as
  ``aux_hidden_state_layer_ids`` (the input of layer i, i.e. our tap i-1; 0 is tap -1) and
  possibly a reduced draft vocabulary (``draft_vocab_size``; the weights then
  carry ``d2t``, each draft row's offset to its target token id).
  ``speculators_args`` rewrites such a config into the DeepSpec layout.
"""

import math
from typing import Optional

DEEPSPEC_ARCHITECTURES = {"Qwen3DSparkModel": "qwen3", "Gemma4DSparkModel": "gemma4"}
EAGLE3_ARCHITECTURES = {"Qwen3Eagle3Model": "qwen3", "Gemma4Eagle3Model": "gemma4"}  # DeepSpec's EAGLE3
ZLAB_ARCHITECTURES = {"DFlashDraftModel"}
ZLAB_DEFAULT_BLOCK = 16

# model_type of a drafter -> the family whose layer variant it uses
FAMILY_OF_MODEL_TYPE = {
    "qwen3": "qwen3",
    "gemma4": "gemma4",
    "gemma4_text": "gemma4",
    "gemma4_unified": "gemma4",
}


def family_of_model_type(model_type) -> str:
    """The drafter family of a *target* model_type: Gemma-4 targets have
    Gemma-4-style drafters, every other target Qwen3-style ones."""
    return FAMILY_OF_MODEL_TYPE.get(model_type, "qwen3")

_DRAFTER_FIELDS = (
    "block_size",
    "target_layer_ids",
    "mask_token_id",
    "num_target_layers",
    "markov_rank",
    "markov_head_type",
    "enable_confidence_head",
    "confidence_head_with_markov",
)


SPECULATORS_TYPES = ("dspark", "dflash", "eagle3")  # speculators_model_type values we run
SPECULATORS_FAMILIES = {"qwen3": "qwen3"}  # transformer_layer_config model_type -> family
# DeepSpec's Markov heads (``markov_head_type``) and the weights each adds
# beside markov_w1 / markov_w2.
MARKOV_HEAD_TYPES = {"vanilla": (), "gated": ("gate_proj",), "rnn": ("joint_proj",)}
# Qwen3Config's defaults: speculators saves transformer_layer_config as a
# diff against them (``to_diff_dict``), so a field equal to its default is absent.
QWEN3_DEFAULTS = {
    "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128, "hidden_act": "silu",
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "attention_bias": False, "tie_word_embeddings": False,
}
# Settings of speculators' EAGLE3 that change the network in ways DeepSpec's does not.
_SPECULATORS_EAGLE3_UNSUPPORTED = ("norm_before_fc", "fc_norm", "norm_output")


class DrafterConfigError(ValueError):
    """A drafter checkpoint whose config.json (or weights) cannot describe a
    working drafter; the message names the field, its value and what it
    should be."""


def _malformed(source) -> str:
    where = f"the checkpoint at {source}" if source else "the drafter checkpoint"
    return f"{where} is malformed (fix its config.json or use another checkpoint)"


def _architectures(config: dict) -> tuple:
    arch = config.get("architectures") or ()
    arch = (arch,) if isinstance(arch, str) else arch if isinstance(arch, (list, tuple)) else ()
    return tuple(a for a in arch if isinstance(a, str))


def speculators_type(config: dict) -> Optional[str]:
    """A speculators checkpoint's ``speculators_model_type`` ("" when its
    config has the speculators fields but not that one), else None."""
    if not isinstance(config, dict):
        return None
    if "speculators_model_type" in config or isinstance(config.get("speculators_config"), dict):
        value = config.get("speculators_model_type")
        return value if isinstance(value, str) else ""
    return None


def layout_of(config: dict) -> Optional[str]:
    """Which DSpark/DFlash drafter layout a config.json is in, or None for any
    other model (EAGLE3 drafters included: ``is_eagle3_config``)."""
    if not isinstance(config, dict):
        return None
    kind = speculators_type(config)
    if kind is not None:
        return "speculators" if kind in ("dspark", "dflash") else None
    archs = _architectures(config)
    if any(a in ZLAB_ARCHITECTURES for a in archs):
        return "zlab"
    if isinstance(config.get("dflash_config"), dict):
        return "dflash_config"
    if any(a in DEEPSPEC_ARCHITECTURES for a in archs):
        return "deepspec"
    if all(k in config for k in ("block_size", "target_layer_ids", "mask_token_id")):
        return "deepspec"
    return None


def is_eagle3_config(config: dict) -> bool:
    if speculators_type(config) is not None:
        return speculators_type(config) == "eagle3"
    return any(a in EAGLE3_ARCHITECTURES for a in _architectures(config))


_DRAFTER_ARCHITECTURE_ENDINGS = ("DSparkModel", "DFlashModel", "Eagle3Model", "DraftModel", "Speculator")
_DRAFTER_ONLY_FIELDS = ("target_layer_ids", "ttt_length", "markov_rank", "aux_hidden_state_layer_ids",
                        "eagle_aux_hidden_state_layer_ids", "dflash_config")


def looks_like_drafter(config: dict) -> bool:
    """Whether a config.json is some drafter's, recognised or not: a drafter
    architecture name, the speculators fields, or fields only drafters have."""
    if not isinstance(config, dict):
        return False
    if speculators_type(config) is not None:
        return True
    if any(a.endswith(_DRAFTER_ARCHITECTURE_ENDINGS) for a in _architectures(config)):
        return True
    return any(k in config for k in _DRAFTER_ONLY_FIELDS)


def is_drafter_config(config: dict) -> bool:
    """Whether config.json is a drafter's; one that no kind runs is still a
    drafter (loading it then says what is recognised, not mlx-lm's KeyError)."""
    return layout_of(config) is not None or is_eagle3_config(config) or looks_like_drafter(config)


def recognised() -> str:
    """What this package runs, for errors about a drafter it does not."""
    return (
        f"architectures {sorted(DEEPSPEC_ARCHITECTURES) + sorted(EAGLE3_ARCHITECTURES) + sorted(ZLAB_ARCHITECTURES)}"
        f" (DeepSpec / z-lab layouts, or DeepSpec's fields nested under dflash_config), and vLLM speculators "
        f"checkpoints with speculators_model_type {list(SPECULATORS_TYPES)} over a "
        f"{sorted(SPECULATORS_FAMILIES)} transformer_layer_config"
    )


def unrecognised_drafter(config: dict, source=None) -> str:
    """The one-line error for a drafter config no kind recognises."""
    where = f" at {source}" if source else ""
    kind = speculators_type(config)
    if kind is not None:
        what = f"a speculators checkpoint of type {kind!r}" if kind else "a speculators checkpoint without speculators_model_type"
    else:
        archs = list(_architectures(config))
        what = f"a drafter with architectures {archs}" if archs else "a drafter config without a known architecture"
    return f"The checkpoint{where} is {what}, which mlx-lm-dspark does not run; it recognises {recognised()}."


def _tap_of_speculators(layer_ids, source) -> list:
    """speculators' aux layer id i is the hidden state entering layer i (the
    output of layer i-1); 0, the embeddings entering layer 0, is our tap -1."""
    if not isinstance(layer_ids, list) or not all(_is_int(i) for i in layer_ids) or not layer_ids:
        raise DrafterConfigError(
            f"aux_hidden_state_layer_ids is {layer_ids!r}, expected a non-empty list of layer indices: "
            f"{_malformed(source)}."
        )
    if min(layer_ids) < 0:
        raise DrafterConfigError(
            f"aux_hidden_state_layer_ids {layer_ids} has a negative layer id (expected ids >= 0, 0 being the "
            f"embeddings): {_malformed(source)}."
        )
    return [i - 1 for i in layer_ids]


def _speculative_tokens(config: dict) -> Optional[int]:
    """The default proposal method's ``speculative_tokens``."""
    spec = config.get("speculators_config") or {}
    methods = spec.get("proposal_methods") or []
    default = spec.get("default_proposal_method")
    for method in methods:
        if isinstance(method, dict) and (default is None or method.get("proposal_type") == default):
            return method.get("speculative_tokens")
    return None


def speculators_args(config: dict, source=None) -> dict:
    """A speculators config rewritten in the DeepSpec layout (the network's
    fields at the top level, taps as our layer-output indices), with
    ``draft_vocab_size`` when the draft vocabulary is reduced."""
    kind = speculators_type(config)
    if kind not in SPECULATORS_TYPES:
        raise DrafterConfigError(unrecognised_drafter(config, source))
    layer = config.get("transformer_layer_config")
    if not isinstance(layer, dict):
        raise DrafterConfigError(
            f"transformer_layer_config is {layer!r}, expected a JSON object: {_malformed(source)}."
        )
    model_type = layer.get("model_type", "qwen3")
    family = SPECULATORS_FAMILIES.get(model_type)
    if family is None:
        raise DrafterConfigError(
            f"speculators {kind} drafter over a {model_type!r} transformer_layer_config: mlx-lm-dspark runs "
            f"speculators drafters over {sorted(SPECULATORS_FAMILIES)} layers (at {source or 'this checkpoint'})."
        )
    args = {**QWEN3_DEFAULTS, **{k: v for k, v in layer.items() if v is not None}}
    args["model_type"] = model_type
    if "rope_parameters" in layer and "rope_theta" not in layer:
        args.pop("rope_theta")
    draft_vocab = config.get("draft_vocab_size")
    if draft_vocab is not None and draft_vocab != args["vocab_size"]:
        if not (_is_int(draft_vocab) and 1 <= draft_vocab < args["vocab_size"]):
            raise DrafterConfigError(
                f"draft_vocab_size is {draft_vocab!r}, expected an integer from 1 to the target vocabulary "
                f"({args['vocab_size']}): {_malformed(source)}."
            )
        args["draft_vocab_size"] = draft_vocab
    if config.get("target_hidden_size") not in (None, args["hidden_size"]):
        raise DrafterConfigError(
            f"target_hidden_size {config['target_hidden_size']} differs from the drafter's hidden_size "
            f"{args['hidden_size']}: mlx-lm-dspark runs drafters as wide as their target (at {source or 'this checkpoint'})."
        )
    if kind == "eagle3":
        on = [k for k in _SPECULATORS_EAGLE3_UNSUPPORTED if config.get(k)]
        if on:
            raise DrafterConfigError(
                f"speculators EAGLE3 drafter with {', '.join(on)} on: mlx-lm-dspark runs EAGLE3 drafters "
                f"without {', '.join(_SPECULATORS_EAGLE3_UNSUPPORTED)} (at {source or 'this checkpoint'})."
            )
        taps = config.get("eagle_aux_hidden_state_layer_ids") or config.get("aux_hidden_state_layer_ids")
        args.update({
            "architectures": ["Qwen3Eagle3Model"],
            "target_layer_ids": _tap_of_speculators(taps, source),
            "ttt_length": _speculative_tokens(config),
            "norm_before_residual": bool(config.get("norm_before_residual", False)),
        })
        return args
    args.update({
        "architectures": ["Qwen3DSparkModel"],
        "target_layer_ids": _tap_of_speculators(config.get("aux_hidden_state_layer_ids"), source),
        "block_size": config.get("block_size"),
        "mask_token_id": config.get("mask_token_id"),
        # sample_from_anchor false: the anchor's slot is spent, slot i predicts its own position (z-lab's alignment)
        "shifted_alignment": not config.get("sample_from_anchor", kind == "dspark"),
    })
    if kind == "dspark":
        for key, default in (("markov_rank", 256), ("markov_head_type", "vanilla"),
                             ("enable_confidence_head", True), ("confidence_head_with_markov", True)):
            args[key] = config.get(key, default)
    else:
        args.update({"markov_rank": 0, "enable_confidence_head": False, "confidence_head_with_markov": False})
    return args


def _family(config: dict, source=None) -> str:
    for arch in _architectures(config):
        if arch in DEEPSPEC_ARCHITECTURES:
            return DEEPSPEC_ARCHITECTURES[arch]
    model_type = config.get("model_type")
    family = FAMILY_OF_MODEL_TYPE.get(model_type)
    if family is None:
        raise DrafterConfigError(
            f"Unsupported drafter family: model_type {model_type!r} (in {source or 'the drafter config'}). "
            f"mlx-lm-dspark runs drafters for {sorted(set(FAMILY_OF_MODEL_TYPE.values()))} targets."
        )
    return family


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _positive_int(v):
    return None if _is_int(v) and v >= 1 else "an integer >= 1"


def _non_negative_int(v):
    return None if _is_int(v) and v >= 0 else "an integer >= 0"


def _positive_number(v):
    return None if _is_number(v) and v > 0 else "a number > 0"


def _boolean(v):
    return None if isinstance(v, bool) else "true or false"


def _mapping(v):
    return None if isinstance(v, dict) else "a JSON object"


def _string_list(v):
    return None if isinstance(v, list) and all(isinstance(x, str) for x in v) else "a list of strings"


def _taps(v):
    if not isinstance(v, list) or not v:
        return "a non-empty list of target layer indices"
    if not all(_is_int(i) and i >= -1 for i in v):
        return "a list of integer target layer indices >= 0 (or -1, the embedding output)"
    if len(set(v)) != len(v):
        return "a list of distinct target layer indices (each layer tapped once)"
    return None


# field -> (check returning what is expected, or None when the value is fine; required)
_FIELD_CHECKS = {
    "hidden_size": (_positive_int, True),
    "num_hidden_layers": (_positive_int, True),
    "intermediate_size": (_positive_int, True),
    "num_attention_heads": (_positive_int, True),
    "num_key_value_heads": (_positive_int, True),
    "vocab_size": (_positive_int, True),
    "rms_norm_eps": (_positive_number, True),
    "block_size": (_positive_int, True),
    "target_layer_ids": (_taps, True),
    "mask_token_id": (_non_negative_int, True),
    "head_dim": (_positive_int, False),
    "num_target_layers": (_positive_int, False),
    "markov_rank": (_non_negative_int, False),
    "enable_confidence_head": (_boolean, False),
    "confidence_head_with_markov": (_boolean, False),
    "layer_types": (_string_list, False),
    "sliding_window": (_positive_int, False),
    "rope_theta": (_positive_number, False),
    "rope_scaling": (_mapping, False),
    "rope_parameters": (_mapping, False),
    "max_position_embeddings": (_positive_int, False),
    "global_head_dim": (_positive_int, False),
    "num_global_key_value_heads": (_positive_int, False),
    "attention_k_eq_v": (_boolean, False),
    "final_logit_softcapping": (_positive_number, False),
}


def _field_problems(args: dict) -> list:
    problems, missing = [], []
    for key, (check, required) in _FIELD_CHECKS.items():
        value = args.get(key)
        if value is None:
            if required:
                missing.append(key)
            continue
        expected = check(value)
        if expected:
            problems.append(f"{key} is {value!r}, expected {expected}")
    if missing:
        problems.insert(0, f"missing {', '.join(missing)}")
    return problems


def _consistency_problems(args: dict) -> list:
    problems = []
    vocab, mask = args.get("vocab_size"), args.get("mask_token_id")
    if _is_int(vocab) and _is_int(mask) and not mask < vocab:
        problems.append(f"mask_token_id is {mask}, outside the vocabulary (expected 0 <= id < vocab_size {vocab})")
    heads, kv_heads = args.get("num_attention_heads"), args.get("num_key_value_heads")
    if _is_int(heads) and _is_int(kv_heads) and heads >= 1 and kv_heads >= 1 and heads % kv_heads:
        problems.append(
            f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
        )
    taps, layers = args.get("target_layer_ids"), args.get("num_target_layers")
    if _taps(taps) is None and _is_int(layers) and max(taps) >= layers:
        problems.append(
            f"target_layer_ids {taps} tap layers beyond num_target_layers {layers} (expected indices < {layers})"
        )
    types, n = args.get("layer_types"), args.get("num_hidden_layers")
    if _string_list(types) is None and _is_int(n) and len(types) < n:
        problems.append(f"layer_types lists {len(types)} entries for {n} layers (num_hidden_layers)")
    return problems


def _zlab_settings(config: dict, nested: dict, source) -> dict:
    """What z-lab's reference reads from ``dflash_config`` (else the top
    level): ``is_causal`` (absent: sliding-window layers attend causally
    inside the block, full ones bidirectionally), ``input_embedding_scale``
    (the borrowed raw embedding's factor), ``output_multiplier`` and
    ``final_logit_softcapping`` (applied to the borrowed head's logits)."""
    def value(name):
        return nested.get(name, config.get(name))

    is_causal = value("is_causal")
    if is_causal is not None and not isinstance(is_causal, bool):
        raise DrafterConfigError(f"is_causal is {is_causal!r}, expected true or false: {_malformed(source)}.")
    out = {"causal_layer_types": ["sliding_attention"] if is_causal is None
           else ["full_attention", "sliding_attention"] if is_causal else []}
    for name in ("input_embedding_scale", "output_multiplier", "final_logit_softcapping"):
        v = value(name)
        if v is not None:
            if not (_is_number(v) and v > 0):
                raise DrafterConfigError(f"{name} is {v!r}, expected a number > 0: {_malformed(source)}.")
            out[name] = v
    return out


def check_drafter_args(args: dict, source=None) -> None:
    """Raise ``DrafterConfigError`` naming every field of the flattened
    drafter settings that is missing, of the wrong type, out of range or
    inconsistent with another (checked before any network is built: a bad
    value would otherwise fail deep inside mlx, or never)."""
    problems = _field_problems(args) or _consistency_problems(args)
    if problems:
        layout = args.get("layout")
        what = f"Drafter config ({layout} layout)" if layout else "Drafter config"
        raise DrafterConfigError(f"{what}: {'; '.join(problems)}: {_malformed(source)}.")


def drafter_args(config: dict, source=None) -> dict:
    """Flatten any drafter layout into the dict ``drafter.ModelArgs.from_dict``
    takes, after checking every field (``source``: the checkpoint's path, named
    in errors)."""
    if not isinstance(config, dict):
        raise DrafterConfigError(
            f"config.json holds a JSON {type(config).__name__}, expected an object: {_malformed(source)}."
        )
    layout = layout_of(config)
    if layout is None:
        raise ValueError("Not a DSpark/DFlash drafter config.")
    if layout == "speculators":
        config = speculators_args(config, source)
    nested = config.get("dflash_config")
    if nested is not None and not isinstance(nested, dict):
        raise DrafterConfigError(f"dflash_config is {nested!r}, expected a JSON object: {_malformed(source)}.")
    args = dict(config)
    nested = nested or {}
    for key in _DRAFTER_FIELDS:
        if key in nested:
            args[key] = nested[key]
    args["family"] = family = _family(config, source)
    args["layout"] = layout

    if layout == "zlab":
        args.update(_zlab_settings(config, nested, source))
        args.setdefault("block_size", ZLAB_DEFAULT_BLOCK)
        args["markov_rank"] = 0
        args["enable_confidence_head"] = False
        args["confidence_head_with_markov"] = False
        args["shifted_alignment"] = True
        args["has_embeddings"] = False
    else:
        if args.get("markov_rank") is None:
            args["markov_rank"] = 0
        for key in ("enable_confidence_head", "confidence_head_with_markov"):
            if args.get(key) is None:
                args[key] = False
        args["shifted_alignment"] = bool(args.get("shifted_alignment")) if layout == "speculators" else False
        args["has_embeddings"] = True
    markov_type = args.get("markov_head_type")
    if args["markov_rank"] > 0:
        markov_type = "vanilla" if markov_type is None else markov_type
        if markov_type not in MARKOV_HEAD_TYPES:
            raise DrafterConfigError(
                f"markov_head_type is {markov_type!r}: mlx-lm-dspark runs DeepSpec's Markov heads "
                f"{list(MARKOV_HEAD_TYPES)}; {_malformed(source)}."
            )
        args["markov_head_type"] = markov_type

    check_drafter_args(args, source)
    if "head_dim" not in args or args["head_dim"] is None:
        args["head_dim"] = args["hidden_size"] // args["num_attention_heads"]
    if family == "qwen3":
        rope = args.get("rope_parameters") or {}
        if args.get("rope_theta") is None:
            args["rope_theta"] = rope.get("rope_theta", 1e6)
        if args.get("rope_scaling") is None and rope:
            args["rope_scaling"] = rope
    return args
