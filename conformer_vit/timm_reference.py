"""timm's `VisionTransformer` as the reference: in a config's shape, or loaded from Google's `.npz` by timm's own
loader. Needs timm (the `bench` and `dev` extras)."""

from functools import partial

from configuration_conformer import ConformerConfig
from conformer_vit.google_npz import CheckpointArchitecture, keeps_checkpoint_head


def timm_vit(config: ConformerConfig, **changes):
    """timm's `VisionTransformer` in `config`'s shape, random weights; `changes` are its own arguments."""
    from timm.models.vision_transformer import VisionTransformer

    shape = dict(
        img_size=config.image_size,
        in_chans=config.num_channels,
        patch_size=config.patch_size,
        embed_dim=config.hidden_size,
        depth=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        mlp_ratio=config.intermediate_size / config.hidden_size,
        qkv_bias=config.qkv_bias,
        num_classes=config.num_labels,
    )
    return VisionTransformer(**shape | changes)


def timm_reference(npz_path, config: ConformerConfig, architecture: CheckpointArchitecture):
    """timm's `VisionTransformer` of the same shape (for the hybrid, its R50 `ResNetV2` with `StdConv2dSame`,
    `preact=False`, `stem_type="same"`, as `vit_base_r50_s16_224` builds it), loaded by timm's `_load_weights`.

    timm has no `pre_logits` layer (its loader skips those arrays), so the reference has timm's head only when ours is
    the checkpoint's own head without pre-logits; `verify_folder` computes the pre-logits case by hand.
    """
    from timm.layers import HybridEmbed
    from timm.models.vision_transformer import _load_weights
    from timm.models.vision_transformer_hybrid import _resnetv2

    plain_head = config.representation_size is None and keeps_checkpoint_head(config, architecture)
    changes = dict(
        no_embed_class=not architecture.position_has_class_slot,
        num_classes=config.num_labels if plain_head else 0,
        patch_size=config.patch_size // config.backbone_stride,
    )
    if config.backbone_depths:
        backbone = _resnetv2(layers=tuple(config.backbone_depths), in_chans=config.num_channels)
        changes["embed_layer"] = partial(HybridEmbed, backbone=backbone)
    model = timm_vit(config, **changes).eval()
    _load_weights(model, str(npz_path))
    return model
