"""Configuration of Conformer: a Vision Transformer whose tokens are merged inside the network."""

from typing import Literal, get_args

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.activations import ACT2FN

try:  # inside a Hub folder (remote code) the three files are a package
    from .token_merging import decreasing_schedule, staged_schedule
except ImportError:  # imported from the repository root or after `pip install`
    from token_merging import decreasing_schedule, staged_schedule

MergeMode = Literal["none", "bipartite", "submodular", "ward"]
Classifier = Literal["token", "gap", "cnn", "token_gap", "distilled"]
MERGE_MODES, CLASSIFIERS = get_args(MergeMode), get_args(Classifier)


# Google's released ViT shapes (ViT paper, table 1) and the hybrid's ResNet stage depths, plus the
# DeiT / AugReg small sizes used for tests and benchmarks.
def _vit_shape(hidden_size, num_hidden_layers, num_attention_heads, patch_size, **extra):
    return dict(
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=4 * hidden_size,
        patch_size=patch_size,
        **extra,
    )


PRESETS = {
    "ViT-Ti_16": _vit_shape(192, 12, 3, 16),
    "ViT-S_16": _vit_shape(384, 12, 6, 16),
    "ViT-B_16": _vit_shape(768, 12, 12, 16),
    "ViT-B_32": _vit_shape(768, 12, 12, 32),
    "ViT-L_16": _vit_shape(1024, 24, 16, 16),
    "ViT-L_32": _vit_shape(1024, 24, 16, 32),
    "ViT-H_14": _vit_shape(1280, 32, 16, 14),
    "R50-ViT-B_16": _vit_shape(768, 12, 12, 16, backbone_depths=[3, 4, 9]),
}


@strict
class ConformerConfig(PreTrainedConfig):
    r"""
    Configuration of a [`ConformerModel`]: a ViT (optionally the R50+ViT hybrid) with token merging between
    attention and MLP of each layer, and a choice of classifier heads.

    Args:
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, hidden_act, hidden_dropout_prob,
        attention_probs_dropout_prob, initializer_range, image_size, patch_size, num_channels, qkv_bias:
            As in transformers' `ViTConfig` (like it, the config accepts a `hidden_size` that the heads do not divide;
            the attention module refuses it). `hidden_act="gelu"` is the exact (erf) GELU that timm and transformers
            use; Google's Flax code used the tanh approximation, which differs slightly.
        layer_norm_eps (`float`, defaults to 1e-6):
            Google's checkpoints and timm use 1e-6 (transformers' `ViTConfig` defaults to 1e-12).
        representation_size (`int`, *optional*):
            Width of the tanh "pre-logits" layer of Google's ImageNet-21k checkpoints; `None` for no such layer.
        backbone_depths (`list[int]`, *optional*):
            Block counts of the ResNet stages of the hybrid stem (`[3, 4, 9]` for R50+ViT-B/16); `None` for a plain
            patch embedding. The stem then has stride `2 ** (len(backbone_depths) + 1)`, and `patch_size` (the stride
            of one token in pixels) must be a multiple of it.
        merge_mode (`str`, defaults to `"none"`):
            `"none"`, `"bipartite"` (ToMe's bipartite soft matching), `"submodular"` (keep the tokens chosen by a
            facility-location objective, merge every other token into its most similar kept one) or `"ward"` (Ward's
            agglomerative clustering: join the groups whose union adds the least scatter).
        merge_r (`int` or `list[int]`, defaults to 0):
            Tokens removed in each layer: one int for every layer, or one per layer.
        merge_schedule (`str`, defaults to `"constant"`):
            For one int `merge_r`: `"constant"` (that r in every layer, ToMe's default) or `"decreasing"` (ToMe's
            decreasing schedule: 1.5 r in the first layer falling linearly to 0.5 r in the last).
        merge_layers (`list[int]`, *optional*):
            ATC's staged reduction instead of `merge_r`: merge only after the attention of these layers (0-based;
            `[3, 6, 9]` is ATC's blocks 4, 7 and 10), each keeping `merge_keep_rate` of the patch tokens left there.
        merge_keep_rate (`float` or `list[float]`, *optional*):
            With `merge_layers`: the share of the patch tokens each site keeps (one for all sites, or one per site).
        proportional_attention (`bool`, defaults to `True`):
            Add `log(size)` to the attention logits of each key, so a merged token weighs as the patches it stands for.
        classifier (`str`, defaults to `"token"`):
            `"token"` (class token), `"gap"` (size-weighted mean of the patch tokens) or `"cnn"` (tokens laid back on
            the patch grid, then a small convolutional head).
        cnn_head_channels (`int`, defaults to 256):
            Width of the convolutional head when `classifier="cnn"`.

    The architecture of the ViT family (the defaults are Google's ViT); `from_transformers` sets them from a source:
        class_token (`bool`, defaults to `True`):
            A learned class token first (SigLIP and I-JEPA have none: then every token may merge).
        distillation_token (`bool`, defaults to `False`):
            DeiT's distillation token, after the class token (it has a position embedding).
        num_register_tokens (`int`, defaults to 0):
            DINOv2's register tokens, after the class token, added after the position embeddings.
        layer_scale_init_value (`float`, *optional*):
            DINOv2's layer scale: a learned per-channel factor on each residual branch; `None` for none.
        mlp_type (`str`, defaults to `"mlp"`):
            `"mlp"` (fc1, activation, fc2) or `"swiglu"` (DINOv2's SwiGLU feed-forward).
        patch_embedding_bias (`bool`, defaults to `True`):
            CLIP's patch convolution has no bias.
        pre_layernorm (`bool`, defaults to `False`):
            CLIP's layer norm between the embeddings and the first layer.
        final_layernorm (`str`, defaults to `"tokens"`):
            `"tokens"`: the final norm applies to every token (ViT, DINOv2, SigLIP); `"pooled"`: only to the pooled
            class token, the final tokens stay as the last layer left them (CLIP).
        pooler (`str`, defaults to `"none"`):
            The base model's `pooler_output`: `"none"`, `"dense_tanh"` (ViT's and DeiT's pooler on the first token),
            `"class_token"` (the normed class token: DINOv2, CLIP) or `"attention"` (SigLIP's attention-pooling head,
            with proportional attention over merged tokens).
        always_interpolate_position_embeddings (`bool`, defaults to `False`):
            Resample the position embeddings to any input size without being asked (DINOv2).
        position_interpolation_antialias (`bool`, defaults to `False`):
            Antialias that resampling (DINOv2 with registers).
    """

    model_type = "conformer"

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float | int = 0.0
    attention_probs_dropout_prob: float | int = 0.0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-6
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    qkv_bias: bool = True
    representation_size: int | None = None
    backbone_depths: list[int] | None = None
    merge_mode: MergeMode = "none"
    merge_r: int | list[int] = 0
    merge_schedule: Literal["constant", "decreasing"] = "constant"
    merge_layers: list[int] | None = None
    merge_keep_rate: float | list[float] | None = None
    proportional_attention: bool = True
    classifier: Classifier = "token"
    cnn_head_channels: int = 256
    class_token: bool = True
    distillation_token: bool = False
    num_register_tokens: int = 0
    layer_scale_init_value: float | None = None
    mlp_type: Literal["mlp", "swiglu"] = "mlp"
    patch_embedding_bias: bool = True
    pre_layernorm: bool = False
    final_layernorm: Literal["tokens", "pooled"] = "tokens"
    pooler: Literal["none", "dense_tanh", "class_token", "attention"] = "none"
    always_interpolate_position_embeddings: bool = False
    position_interpolation_antialias: bool = False

    def __post_init__(self, **kwargs):
        num_labels = kwargs.get("num_labels")
        if num_labels is not None and (not isinstance(num_labels, int) or num_labels < 0):
            raise ValueError(f"`num_labels` must be a non-negative int (0: no classifier), got {num_labels!r}.")
        if isinstance(self.backbone_depths, tuple):
            self.backbone_depths = list(self.backbone_depths)
        if isinstance(self.merge_r, tuple):
            self.merge_r = list(self.merge_r)
        for name in ("merge_layers", "merge_keep_rate"):
            if isinstance(getattr(self, name), tuple):
                setattr(self, name, list(getattr(self, name)))
        # Both Auto classes must resolve from one saved folder; `save_pretrained` alone records only the saved one.
        kwargs.setdefault(
            "auto_map",
            {
                "AutoConfig": "configuration_conformer.ConformerConfig",
                "AutoModel": "modeling_conformer.ConformerModel",
                "AutoModelForImageClassification": "modeling_conformer.ConformerForImageClassification",
            },
        )
        # Checked here too, so that a bad value raises its own `ValueError` where the config is written, not one
        # wrapped by `@strict`; the model checks the effective config again when it is built.
        self.validate_architecture()
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Raise `ValueError` naming the field and what it accepts when values cannot work together. (`@strict` checks
        each field's type and choices; whether the heads divide `hidden_size` is the attention module's check, as in
        transformers' ViT.)"""
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"`hidden_act` {self.hidden_act!r} is not one of transformers' activations (ACT2FN).")
        needs = {"token": "class_token", "token_gap": "class_token", "distilled": "distillation_token"}
        if self.classifier in needs and not getattr(self, needs[self.classifier]):
            raise ValueError(
                f"`classifier={self.classifier!r}` reads the {needs[self.classifier]}, which this model lacks."
            )
        if self.pooler == "class_token" and not self.class_token:
            raise ValueError(f"`pooler={self.pooler!r}` reads the class token, which this model lacks.")
        if (self.distillation_token or self.num_register_tokens) and not self.class_token:
            raise ValueError("distillation and register tokens come after the class token: set `class_token=True`.")
        if self.classifier == "distilled" and self.representation_size is not None:
            raise ValueError("`classifier='distilled'` has no pre-logits layer: set `representation_size=None`.")
        if not isinstance(self.num_register_tokens, int) or self.num_register_tokens < 0:
            raise ValueError(f"`num_register_tokens` must be a non-negative int, got {self.num_register_tokens!r}.")
        for name in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "image_size",
            "patch_size",
            "num_channels",
            "cnn_head_channels",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
        if self.image_size < self.patch_size:
            raise ValueError(f"`image_size` ({self.image_size}) is smaller than one patch ({self.patch_size} pixels).")
        if self.representation_size is not None and (
            not isinstance(self.representation_size, int) or self.representation_size <= 0
        ):
            raise ValueError(f"`representation_size` must be None or a positive int, got {self.representation_size!r}.")
        if self.backbone_depths is not None:
            if not self.backbone_depths or any(not isinstance(d, int) or d <= 0 for d in self.backbone_depths):
                raise ValueError(
                    f"`backbone_depths` must be None or a list of positive ints such as [3, 4, 9], "
                    f"got {self.backbone_depths!r}."
                )
            if self.patch_size % self.backbone_stride:
                raise ValueError(
                    f"`patch_size` ({self.patch_size}) must be a multiple of the hybrid stem's stride "
                    f"({self.backbone_stride} for {len(self.backbone_depths)} stages)."
                )
        schedule = self.merge_r if isinstance(self.merge_r, (list, tuple)) else [self.merge_r]
        if any(not isinstance(r, int) or isinstance(r, bool) or r < 0 for r in schedule):
            raise ValueError(f"`merge_r` must be a non-negative int or a list of them, got {self.merge_r!r}.")
        if self.merge_layers is not None:
            layers, rates = self.merge_layers, self.merge_keep_rate
            if not layers or any(
                not isinstance(layer, int) or not 0 <= layer < self.num_hidden_layers for layer in layers
            ):
                raise ValueError(
                    f"`merge_layers` must list layers of 0..{self.num_hidden_layers - 1}, got {self.merge_layers!r}."
                )
            if sorted(set(layers)) != list(layers):
                raise ValueError(f"`merge_layers` must be increasing and without repeats, got {layers!r}.")
            rates = rates if isinstance(rates, list) else [rates] * len(layers)
            if len(rates) != len(layers) or any(
                not isinstance(rate, (int, float)) or not 0 < rate <= 1 for rate in rates
            ):
                raise ValueError(
                    f"`merge_keep_rate` must be one share in (0, 1] or one per merge layer ({len(layers)}), got "
                    f"{self.merge_keep_rate!r}."
                )
        elif self.merge_keep_rate is not None:
            raise ValueError("`merge_keep_rate` applies to `merge_layers`: give both, or use `merge_r`.")
        if isinstance(self.merge_r, (list, tuple)) and len(self.merge_r) != self.num_hidden_layers:
            raise ValueError(
                f"`merge_r` lists {len(self.merge_r)} values but the model has {self.num_hidden_layers} layers; "
                "give one int per layer or a single int."
            )

    @property
    def backbone_stride(self):
        """Pixels per feature-map cell of the hybrid stem: the stem (4) times 2 for each stage after the first."""
        return 2 ** (len(self.backbone_depths) + 1) if self.backbone_depths else 1

    @property
    def num_prefix_tokens(self):
        """Tokens before the patches: class, distillation, registers. None of them ever merges."""
        return int(self.class_token) + int(self.distillation_token) + self.num_register_tokens

    @property
    def num_position_prefix_tokens(self):
        """Prefix tokens with a position embedding (registers have none)."""
        return int(self.class_token) + int(self.distillation_token)

    @property
    def num_patches(self):
        return (self.image_size // self.patch_size) ** 2

    @property
    def merge_r_per_layer(self):
        """One r per layer, from `merge_layers` and `merge_keep_rate`, else `merge_r` (and `merge_schedule`); all zeros
        when merging is off."""
        layers = self.num_hidden_layers
        if self.merge_mode == "none":
            return [0] * layers
        if self.merge_layers is not None:
            tokens = self.num_prefix_tokens + self.num_patches
            return staged_schedule(tokens, layers, self.merge_layers, self.merge_keep_rate, self.num_prefix_tokens)
        if isinstance(self.merge_r, list):
            return list(self.merge_r)
        if self.merge_schedule == "decreasing":
            return decreasing_schedule(self.merge_r, layers)
        return [self.merge_r] * layers

    @classmethod
    def from_preset(cls, name, **overrides):
        """A config for one of Google's released models (`ViT-B_16`, `R50-ViT-B_16`, ...), `ViT-Ti_16` or `ViT-S_16`."""
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; known presets: {', '.join(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})


__all__ = ["ConformerConfig", "PRESETS"]
