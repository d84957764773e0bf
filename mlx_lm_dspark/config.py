"""Recognise drafter checkpoints from config.json and normalise their layouts.

Three on-disk layouts carry the same network:
- DeepSpec (DeepSeek's release): ``Qwen3DSparkModel`` / ``Gemma4DSparkModel``
  architectures with the drafter fields at the top level;
- community conversions: the drafter fields nested under ``dflash_config``;
- z-lab DFlash: ``DFlashDraftModel``, fields under ``dflash_config``, no
  embeddings / LM head in the weights (borrowed from the target) and a shifted
  block alignment (slot i predicts its own position).
"""

import math
from typing import Optional

DEEPSPEC_ARCHITECTURES = {"Qwen3DSparkModel": "qwen3", "Gemma4DSparkModel": "gemma4"}
EAGLE3_ARCHITECTURES = {"Qwen3Eagle3Model": "qwen3", "Gemma4Eagle3Model": "gemma4"}  # DeepSpec's EAGLE3
ZLAB_ARCHITECTURES = {"DFlashDraftModel"}
ZLAB_DEFAULT_BLOCK = 16

# model_type of a drafter / target -> the family whose layer variant it uses
FAMILY_OF_MODEL_TYPE = {
    "qwen3": "qwen3",
    "gemma4": "gemma4",
    "gemma4_text": "gemma4",
    "gemma4_unified": "gemma4",
}

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


def layout_of(config: dict) -> Optional[str]:
    """Which drafter layout a config.json is in, or None for any other model."""
    if not isinstance(config, dict):
        return None
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
    return any(a in EAGLE3_ARCHITECTURES for a in _architectures(config))


def is_drafter_config(config: dict) -> bool:
    return layout_of(config) is not None or is_eagle3_config(config)


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
    if not all(_is_int(i) and i >= 0 for i in v):
        return "a list of integer target layer indices >= 0"
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
        args["shifted_alignment"] = False
        args["has_embeddings"] = True

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
