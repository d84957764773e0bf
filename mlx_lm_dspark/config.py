"""Recognise drafter checkpoints from config.json and normalise their layouts.

Three on-disk layouts carry the same network:
- DeepSpec (DeepSeek's release): ``Qwen3DSparkModel`` / ``Gemma4DSparkModel``
  architectures with the drafter fields at the top level;
- community conversions: the drafter fields nested under ``dflash_config``;
- z-lab DFlash: ``DFlashDraftModel``, fields under ``dflash_config``, no
  embeddings / LM head in the weights (borrowed from the target) and a shifted
  block alignment (slot i predicts its own position).
"""

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


def _architectures(config: dict) -> tuple:
    arch = config.get("architectures") or ()
    return (arch,) if isinstance(arch, str) else tuple(arch)


def layout_of(config: dict) -> Optional[str]:
    """Which drafter layout a config.json is in, or None for any other model."""
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


def _family(config: dict) -> str:
    for arch in _architectures(config):
        if arch in DEEPSPEC_ARCHITECTURES:
            return DEEPSPEC_ARCHITECTURES[arch]
    model_type = config.get("model_type")
    family = FAMILY_OF_MODEL_TYPE.get(model_type)
    if family is None:
        raise ValueError(
            f"Unsupported drafter family: model_type {model_type!r}. "
            f"mlx-lm-dspark runs drafters for {sorted(set(FAMILY_OF_MODEL_TYPE.values()))} targets."
        )
    return family


def drafter_args(config: dict) -> dict:
    """Flatten any drafter layout into the dict ``drafter.ModelArgs.from_dict`` takes."""
    layout = layout_of(config)
    if layout is None:
        raise ValueError("Not a DSpark/DFlash drafter config.")
    args = dict(config)
    nested = config.get("dflash_config") or {}
    for key in _DRAFTER_FIELDS:
        if key in nested:
            args[key] = nested[key]
    args["family"] = family = _family(config)
    args["layout"] = layout

    if layout == "zlab":
        args.setdefault("block_size", ZLAB_DEFAULT_BLOCK)
        args["markov_rank"] = 0
        args["enable_confidence_head"] = False
        args["confidence_head_with_markov"] = False
        args["shifted_alignment"] = True
        args["has_embeddings"] = False
    else:
        args.setdefault("markov_rank", 0)
        args["markov_rank"] = int(args["markov_rank"] or 0)
        args.setdefault("enable_confidence_head", False)
        args.setdefault("confidence_head_with_markov", False)
        args["shifted_alignment"] = False
        args["has_embeddings"] = True

    missing = [k for k in ("block_size", "target_layer_ids", "mask_token_id") if args.get(k) is None]
    if missing:
        raise ValueError(f"Drafter config ({layout} layout) is missing {', '.join(missing)}.")
    args["target_layer_ids"] = [int(i) for i in args["target_layer_ids"]]

    if "head_dim" not in args or args["head_dim"] is None:
        args["head_dim"] = args["hidden_size"] // args["num_attention_heads"]
    if family == "qwen3":
        rope = args.get("rope_parameters") or {}
        if args.get("rope_theta") is None:
            args["rope_theta"] = rope.get("rope_theta", 1e6)
        if args.get("rope_scaling") is None and rope:
            args["rope_scaling"] = rope
    return args
