"""Where a Conformer's weights come from: one loader for a Conformer folder or Hub id, a Google `.npz`, or a model of
transformers' ViT family, and the mapping that adapts the family's weights. Not part of any Hub folder.

    load_model("runs/demo")                          # a Conformer folder or Hub id, as saved
    load_model("facebook/dinov2-small", merge_mode="ward", merge_r=8)   # a ViT-family source, adapted
    load_model("ViT-B_16.npz", image_size=384)       # Google's checkpoint, converted in memory
    reconfigured(model, merge_mode="bipartite", merge_r=4)              # the same weights under another config
"""

import copy
import dataclasses
import functools
import os
import pickle
import re
from pathlib import Path

import torch
import transformers
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from torch import nn
from transformers import AutoModel, AutoModelForImageClassification

from configuration_conformer import ConformerConfig
from modeling_conformer import (
    ConformerForImageClassification,
    ConformerModel,
    ConformerPreTrainedModel,
    resample_position_embeddings,
)

# --------------------------------------------------------------------------------------------------------------------
# Adapting weights from elsewhere
# --------------------------------------------------------------------------------------------------------------------

HEAD_PREFIXES = ("classifier.", "distillation_classifier.", "pre_logits.", "cnn_head.")


def adapt_state_dict(state_dict: dict, model: nn.Module, mode: str = "bilinear") -> dict:
    """Fit weights from elsewhere (already under our key names) to `model`, as timm's `checkpoint_filter_fn` does.

    The position embeddings are resampled to the model's grid (`mode` as in `resample_position_embeddings`). When the
    head does not fit (other labels, another classifier, no head), the model's own head is kept with a zero
    classifier, the ViT paper's transfer recipe, so fine-tuning starts from uniform predictions. The result is a
    complete state dict for `model.load_state_dict(..., strict=True)`. Anything else that does not fit (another
    width, depth or patch size) raises `ValueError` naming the weights.
    """
    target = model.state_dict()
    adapted = {}
    for key, value in state_dict.items():
        if key.endswith("embeddings.position_embeddings") and key in target and value.shape != target[key].shape:
            grid = model.config.image_size // model.config.patch_size
            value = resample_position_embeddings(value, (grid, grid), model.config.num_position_prefix_tokens, mode)
        adapted[key] = value

    def is_head(key):
        return key.startswith(HEAD_PREFIXES)

    head_fits = all(
        key in target and target[key].shape == value.shape for key, value in adapted.items() if is_head(key)
    ) and all(key in adapted for key in target if is_head(key))
    if not head_fits:
        adapted = {key: value for key, value in adapted.items() if not is_head(key)}
        for key, value in target.items():
            if is_head(key):
                fresh = key.startswith(("classifier.", "distillation_classifier.")) and value.is_floating_point()
                adapted[key] = torch.zeros_like(value) if fresh else value

    missing = [key for key in target if key not in adapted]
    unexpected = [key for key in adapted if key not in target]
    mismatched = [
        f"{key} {tuple(adapted[key].shape)} -> {tuple(target[key].shape)}"
        for key in target
        if key in adapted and adapted[key].shape != target[key].shape
    ]
    if missing or unexpected or mismatched:
        problems = [
            f"{label}: {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("other shape", mismatched))
            if keys
        ]
        raise ValueError(
            f"The weights do not fit the model ({'; '.join(problems)}): a pretrained model keeps its width, depth and "
            "patch size; only the image size, the head and the merging settings can change."
        )
    return adapted


# --------------------------------------------------------------------------------------------------------------------
# transformers' ViT family: each source's base model maps onto `ConformerModel` by renaming its keys; its head (if
# any) onto ours. With merging off, the Conformer computes what the source computes.
# --------------------------------------------------------------------------------------------------------------------

SOURCE_CLASSES = (
    "ViTModel",
    "ViTForImageClassification",
    "ViTMSNModel",
    "DeiTModel",
    "DeiTForImageClassification",
    "DeiTForImageClassificationWithTeacher",
    "Dinov2Model",
    "Dinov2ForImageClassification",
    "Dinov2WithRegistersModel",
    "Dinov2WithRegistersForImageClassification",
    "CLIPVisionModel",
    "CLIPModel",
    "SiglipVisionModel",
    "SiglipModel",
    "IJepaModel",
    "IJepaForImageClassification",
)

# (pattern, replacement) applied in order to the source base model's keys; a key renamed to "" is dropped.
_DINOV2_KEYS = [
    (r"^encoder\.layer\.", "layers."),
    (r"\.norm1\.", ".layernorm_before."),
    (r"\.norm2\.", ".layernorm_after."),
    (r"\.layer_scale1\.lambda1$", ".attention_scale"),
    (r"\.layer_scale2\.lambda1$", ".mlp_scale"),
    (r"^embeddings\.mask_token$", ""),
]
_CLIP_KEYS = [
    (r"^embeddings\.class_embedding$", "embeddings.cls_token"),
    (r"^embeddings\.patch_embedding\.", "embeddings.patch_embeddings.projection."),
    (r"^embeddings\.position_embedding\.weight$", "embeddings.position_embeddings"),
    (r"^pre_layrnorm\.", "pre_layernorm."),
    (r"^encoder\.layers\.", "layers."),
    (r"\.self_attn\.out_proj\.", ".attention.o_proj."),
    (r"\.self_attn\.", ".attention."),
    (r"\.layer_norm1\.", ".layernorm_before."),
    (r"\.layer_norm2\.", ".layernorm_after."),
    (r"^post_layernorm\.", "layernorm."),
    (r"^head\.", "attention_pooler."),
]
_KEY_RENAMES = {"dinov2": _DINOV2_KEYS, "dinov2_with_registers": _DINOV2_KEYS, "clip_vision_model": _CLIP_KEYS}
_KEY_RENAMES["siglip_vision_model"] = _CLIP_KEYS
# The source head's keys, renamed onto ours, and the classifier that reads what the source's head reads.
BACKBONE_POOLING = {"dinov2": "token_gap", "dinov2_with_registers": "token_gap", "ijepa": "gap"}
_HEADS = {
    "DeiTForImageClassificationWithTeacher": ([(r"^cls_classifier\.", "classifier.")], "distilled"),
    "Dinov2ForImageClassification": ([], "token_gap"),
    "Dinov2WithRegistersForImageClassification": ([], "token_gap"),
    "IJepaForImageClassification": ([], "gap"),
}


def _rename(key: str, renames) -> str:
    for pattern, replacement in renames:
        if re.search(pattern, key):
            if not replacement:
                return ""
            key = re.sub(pattern, replacement, key)
    return key


def _source_architecture(source: nn.Module) -> dict:
    """The Conformer config fields that describe the source's architecture."""
    config, model_type = source.config, source.config.model_type
    # DINOv2 sizes its MLP by mlp_ratio (a stray intermediate_size in its config is ignored there too)
    mlp_width = int(config.hidden_size * config.mlp_ratio) if hasattr(config, "mlp_ratio") else config.intermediate_size
    fields = dict(
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=mlp_width,
        hidden_act=config.hidden_act,
        hidden_dropout_prob=getattr(config, "hidden_dropout_prob", 0.0),
        attention_probs_dropout_prob=getattr(config, "attention_probs_dropout_prob", None)
        or getattr(config, "attention_dropout", 0.0),
        initializer_range=getattr(config, "initializer_range", 0.02),
        layer_norm_eps=config.layer_norm_eps,
        image_size=config.image_size,
        patch_size=config.patch_size,
        num_channels=config.num_channels,
        qkv_bias=getattr(config, "qkv_bias", True),
    )
    base = getattr(source, source.base_model_prefix, source)
    if getattr(base, "pooler", None) is not None:  # ViT's, DeiT's and I-JEPA's dense + tanh pooler
        if getattr(config, "pooler_act", "tanh") != "tanh" or config.pooler_output_size != config.hidden_size:
            raise ValueError("The source's pooler is not a hidden-size dense layer with tanh; Conformer has no such.")
        fields["pooler"] = "dense_tanh"
    if model_type == "deit":
        fields["distillation_token"] = True
    elif model_type in ("dinov2", "dinov2_with_registers"):
        fields.update(
            layer_scale_init_value=config.layerscale_value,
            mlp_type="swiglu" if config.use_swiglu_ffn else "mlp",
            always_interpolate_position_embeddings=True,
            pooler="class_token",
        )
        if model_type == "dinov2_with_registers":
            fields.update(num_register_tokens=config.num_register_tokens, position_interpolation_antialias=True)
    elif model_type == "clip_vision_model":
        fields.update(patch_embedding_bias=False, pre_layernorm=True, final_layernorm="pooled", pooler="class_token")
    elif model_type == "siglip_vision_model":
        fields.update(class_token=False, pooler="attention" if config.vision_use_head else "none")
    elif model_type == "ijepa":
        fields["class_token"] = False
    return fields


def _source_state_dict(source: nn.Module) -> tuple[dict, dict, str | None]:
    """The source's base-model weights under `ConformerModel`'s names, its head's under ours, and its classifier."""
    base = getattr(source, source.base_model_prefix, source)
    renames = _KEY_RENAMES.get(source.config.model_type, [])
    base_state = {}
    for key, value in base.state_dict().items():
        key = _rename(key, renames)
        if key == "embeddings.cls_token":
            value = value.reshape(1, 1, -1)  # CLIP keeps a [hidden] class embedding
        elif key == "embeddings.position_embeddings" and value.ndim == 2:
            value = value[None]  # CLIP's and SigLIP's nn.Embedding
        if key:
            base_state[key] = value
    head_state, classifier = {}, None
    if base is not source:
        head_renames, classifier = _HEADS.get(type(source).__name__, ([], "token"))
        prefix = f"{source.base_model_prefix}."
        for key, value in source.state_dict().items():
            if not key.startswith(prefix):
                head_state[_rename(key, head_renames)] = value
    return base_state, head_state, classifier


def _source_model(model_or_path, attn_implementation: str | None, **hub_kwargs) -> nn.Module:
    """The source model: a model object, or a local folder / Hub id loaded with the class its config names."""
    supported = f"supported: {', '.join(SOURCE_CLASSES)}"
    if isinstance(model_or_path, nn.Module):
        source = model_or_path
    else:
        config = transformers.AutoConfig.from_pretrained(_checked_location(model_or_path), **hub_kwargs)
        architecture = (getattr(config, "architectures", None) or [None])[0]
        if architecture not in SOURCE_CLASSES:
            raise ValueError(
                f"{model_or_path} holds a {architecture} (a {config.model_type!r} model), not a Conformer and not "
                f"one of the ViT family Conformer takes; {supported}."
            )
        source = getattr(transformers, architecture).from_pretrained(
            model_or_path, attn_implementation=attn_implementation, **hub_kwargs
        )
    if type(source).__name__ not in SOURCE_CLASSES:
        raise TypeError(f"from_transformers cannot take a {type(source).__name__}; {supported}.")
    if type(source).__name__ in ("CLIPModel", "SiglipModel"):
        source = source.vision_model  # the vision tower, before the projection into the joint space
    return source


def from_transformers(
    model_class: type[ConformerPreTrainedModel],
    model_or_path,
    attn_implementation: str | None = None,
    hub_kwargs: dict | None = None,
    **config_overrides,
) -> ConformerPreTrainedModel:
    """`model_class.from_transformers`: a `model_class` with the weights of a ViT-family model (an object, a local
    folder or a Hub id). `config_overrides` set any config field; with merging off the outputs are the source's."""
    _check_names(model_class.config_class, config_overrides)
    source = _source_model(model_or_path, attn_implementation, **(hub_kwargs or {}))
    base_state, head_state, source_classifier = _source_state_dict(source)
    fields = _source_architecture(source)
    source_config = source.config
    has_head = source_classifier is not None and "classifier.weight" in head_state
    # A backbone gets the pooling its family's classification head reads (DINOv2: class token and patch mean).
    default_pooling = BACKBONE_POOLING.get(
        source_config.model_type, "token" if fields.get("class_token", True) else "gap"
    )
    fields["classifier"] = source_classifier or default_pooling
    labels = config_overrides.get("id2label")
    num_labels = config_overrides.get(
        "num_labels", len(labels) if labels else source_config.num_labels if has_head else 0
    )
    if not has_head and num_labels == 0 and "ForImageClassification" in model_class.__name__:
        raise ValueError(
            f"{type(source).__name__} has no classification head: give `num_labels` (or `id2label`) for a new one, "
            "or load it as a ConformerModel."
        )
    if has_head and num_labels == source_config.num_labels and "id2label" not in config_overrides:
        fields.update(id2label=dict(source_config.id2label), label2id=dict(source_config.label2id))
    try:
        config = model_class.config_class(**{**fields, **config_overrides, "num_labels": num_labels})
    except StrictDataclassError as error:
        raise ValueError(_cause_line(error)) from None
    model = model_class._from_config(config, attn_implementation=attn_implementation)
    if model_class.base_model_prefix in dict(model.named_children()):
        state_dict = {f"{model_class.base_model_prefix}.{key}": value for key, value in base_state.items()}
        state_dict.update(head_state)
    else:
        state_dict = base_state
    model.load_state_dict(adapt_state_dict(state_dict, model), strict=True)
    return model.to(next(source.parameters()).dtype)


# --------------------------------------------------------------------------------------------------------------------
# The one loader
# --------------------------------------------------------------------------------------------------------------------


def _cause_line(error: Exception) -> str:
    """The last non-empty line of an error's message: where `@strict` and transformers put the cause."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _check_names(config_class: type[ConformerConfig], overrides: dict):
    """Refuse override names the config does not have: a typo such as `merge_mod` would become a stray attribute."""
    unknown = sorted(set(overrides) - {field.name for field in dataclasses.fields(config_class)} - {"num_labels"})
    if unknown:
        raise ValueError(f"unknown config field(s) {', '.join(map(repr, unknown))}: see ConformerConfig's fields.")


def _checked_location(name_or_path) -> str:
    """`name_or_path` as a string, once it is a path or a Hub id: a local path that looks like a path must exist."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ValueError(
            f"expected a folder, a Hub id, an .npz file or a model object, got a {type(name_or_path).__name__}"
        )
    text = os.fspath(name_or_path)
    path = Path(text)
    owner, _, name = text.rpartition("/")
    # A Hub id is `name` or `owner/name` (unless `owner` is a local folder); anything else is a local path.
    hub_id = name and not text.startswith((".", "/", "~")) and "/" not in owner and not (owner and Path(owner).is_dir())
    if not path.exists() and not hub_id:
        raise FileNotFoundError(f"{text}: no such file or folder")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ValueError(f"{text} has no config.json: give a folder written by save_pretrained")
    return text


def with_config(model: ConformerPreTrainedModel, config: ConformerConfig, model_class=None) -> ConformerPreTrainedModel:
    """A new `model_class` (default: `model`'s class) built from `config`, with `model`'s weights adapted to it
    (`adapt_state_dict`: position embeddings resampled, a new zero classifier where the head no longer fits). A
    `ConformerModel` backbone given a classifier class becomes that classifier's base model, under a new head."""
    model_class = model_class or type(model)
    dtype = next(model.parameters()).dtype
    new_model = model_class._from_config(config, attn_implementation=model.config._attn_implementation, dtype=dtype)
    state = model.state_dict()
    if not hasattr(model, model.base_model_prefix) and hasattr(new_model, new_model.base_model_prefix):
        state = {f"{new_model.base_model_prefix}.{key}": value for key, value in state.items()}
    new_model.load_state_dict(adapt_state_dict(state, new_model), strict=True)
    return new_model.train(model.training)


def reconfigured(model: ConformerPreTrainedModel, **changes) -> ConformerPreTrainedModel:
    """`with_config` for `model`'s config changed by `changes`. Merge settings change no weight, so
    `reconfigured(model, merge_mode="ward", merge_r=8)` is the same network merging otherwise. Without changes,
    `model` itself."""
    if not changes:
        return model
    config = copy.deepcopy(model.config)
    _check_names(type(config), changes)
    try:
        for key, value in changes.items():  # all set before any check: a new depth and its schedule go together
            setattr(config, key, value)
        config.validate_architecture()
    except StrictDataclassError as error:
        raise ValueError(_cause_line(error)) from None
    return with_config(model, config)


def _class_for(model_class, source_class: str, config_overrides: dict):
    """`ConformerModel` for a ViT-family backbone when no labels are asked for: a classifier needs classes."""
    asks_labels = "num_labels" in config_overrides or "id2label" in config_overrides
    if "ForImageClassification" in source_class or asks_labels or model_class is not ConformerForImageClassification:
        return model_class
    return ConformerModel


def load_model(
    source,
    model_class: type[ConformerPreTrainedModel] = ConformerForImageClassification,
    attn_implementation: str | None = None,
    dtype: torch.dtype | None = None,
    hub_kwargs: dict | None = None,
    trust_remote_code: bool = False,
    **config_overrides,
) -> ConformerPreTrainedModel:
    """A `model_class` from any source the project takes: a Conformer folder or Hub id (loaded with this package's
    classes), a Google `.npz` (converted in memory, exact to timm's loader), a ViT-family folder, Hub id or model
    object (`from_transformers`). `config_overrides` change the config (merging, image size, labels, head);
    `hub_kwargs` (cache_dir, revision, token) go to the Hub. A Conformer folder's own code runs only with
    `trust_remote_code`. Bad input raises `ValueError` or `OSError` naming it."""
    hub_kwargs = hub_kwargs or {}
    if isinstance(source, ConformerPreTrainedModel):
        return reconfigured(source, **config_overrides)
    if isinstance(source, nn.Module):
        model_class = _class_for(model_class, type(source).__name__, config_overrides)
        model = from_transformers(model_class, source, attn_implementation, **config_overrides)
        return model.to(dtype) if dtype is not None else model
    location = _checked_location(source)
    if location.endswith(".npz") and Path(location).is_file():
        from conformer_vit.google_npz import convert_checkpoint

        model = convert_checkpoint(location, **config_overrides)
        return model.to(dtype) if dtype is not None else model
    try:
        config_dict, _ = transformers.PretrainedConfig.get_config_dict(location, **hub_kwargs)
        if config_dict.get("model_type") != "conformer":
            model_class = _class_for(model_class, (config_dict.get("architectures") or [""])[0], config_overrides)
            model = from_transformers(model_class, location, attn_implementation, hub_kwargs, **config_overrides)
            return model.to(dtype) if dtype is not None else model
        # This package's classes, unless the caller trusts the folder's own code: then transformers' Auto class runs it.
        loader = model_class.from_pretrained
        if trust_remote_code:
            auto = AutoModel if model_class.__name__ == "ConformerModel" else AutoModelForImageClassification
            loader = functools.partial(auto.from_pretrained, trust_remote_code=True)
        model, loading = loader(
            location, attn_implementation=attn_implementation, dtype=dtype, output_loading_info=True, **hub_kwargs
        )
    except (SafetensorError, RuntimeError, pickle.UnpicklingError, EOFError) as error:
        # A truncated or foreign weights file, weights of other shapes than config.json says, a planted pickle.
        raise ValueError(f"{location}: its weights cannot be loaded: {_cause_line(error)}") from None
    except (ValueError, StrictDataclassError) as error:  # a config that cannot work: named with its folder
        message = _cause_line(error)
        raise ValueError(message if location in message else f"{location}: {message}") from None
    problems = [f"{kind.split('_')[0]} {', '.join(map(str, sorted(keys)[:3]))}" for kind, keys in loading.items()
                if kind in ("missing_keys", "unexpected_keys", "mismatched_keys") and keys]  # fmt: skip
    if problems:
        raise ValueError(f"{location}: the weights do not fit its config.json ({'; '.join(problems)})")
    return reconfigured(model, **config_overrides)


def load_image_processor(source, config: ConformerConfig, hub_kwargs: dict | None = None):
    """The source's own image processor when its folder (or Hub repo) has one and the resolution is unchanged;
    otherwise `default_image_processor` at the model's size, with the source processor's statistics if it has some."""
    from conformer_vit.hub_folder import default_image_processor

    processor, source_size = None, None
    if isinstance(source, nn.Module):
        source_size = getattr(getattr(source.config, "vision_config", source.config), "image_size", None)
    elif isinstance(source, (str, os.PathLike)) and not os.fspath(source).endswith(".npz"):
        try:
            processor = transformers.AutoImageProcessor.from_pretrained(source, **(hub_kwargs or {}))
            config_dict, _ = transformers.PretrainedConfig.get_config_dict(source, **(hub_kwargs or {}))
            source_size = config_dict.get("vision_config", config_dict).get("image_size")
        except (OSError, ValueError):  # no preprocessor_config.json
            pass
    if processor is not None and source_size in (None, config.image_size):
        return processor
    mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
    return default_image_processor(config, mean, std)


def source_license(source) -> str | None:
    """The `license` of the source's own model card (README.md of its folder or Hub repo), if it has one."""
    from huggingface_hub import ModelCard

    if not isinstance(source, (str, os.PathLike)):
        return None
    try:
        return ModelCard.load(Path(source, "README.md") if Path(source).is_dir() else source).data.license
    except Exception:  # no card, offline, not a repo: the card then names no license
        return None
