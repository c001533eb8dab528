"""Conformer: a Vision Transformer whose tokens are merged between attention and MLP of each layer.

The model only, in the order data flows: embeddings, attention, MLP, layer (attention, merge, MLP), base model, heads.
The merge functions are `token_merging.py`'s and the config is `configuration_conformer.py`'s; a Hub folder carries all
three files, as `save_pretrained` copies what this file imports relatively.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BitBackbone, BitConfig, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, auto_docstring, logging
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

try:  # inside a Hub folder (remote code) the three files are a package
    from .configuration_conformer import ConformerConfig
    from .token_merging import check_merge_schedule, match_tokens, merge_source, merge_wavg
except ImportError:  # imported from the repository root or after `pip install`
    from configuration_conformer import ConformerConfig
    from token_merging import check_merge_schedule, match_tokens, merge_source, merge_wavg

logger = logging.get_logger(__name__)


def resample_position_embeddings(
    position_embeddings: torch.Tensor,
    new_grid: tuple[int, int],
    num_prefix_tokens: int = 1,
    mode: str = "bicubic",
    antialias: bool = False,
) -> torch.Tensor:
    """Resample [1, prefix + h*w, dim] position embeddings on their 2-D grid to `new_grid`, prefix tokens kept apart.

    The old grid must be square (as in all released ViTs). `mode="bicubic"` is what transformers' ViT does at run time;
    the converter uses `"bilinear"` as timm's checkpoint loader does.
    """
    prefix, grid = position_embeddings[:, :num_prefix_tokens], position_embeddings[:, num_prefix_tokens:]
    old_side = int(math.isqrt(grid.shape[1]))
    if old_side * old_side != grid.shape[1]:
        raise ValueError(f"Position embeddings of {grid.shape[1]} patches do not form a square grid.")
    if tuple(new_grid) == (old_side, old_side):
        return position_embeddings
    dim = grid.shape[-1]
    grid = grid.reshape(1, old_side, old_side, dim).permute(0, 3, 1, 2)  # [1, dim, h, w]
    grid = F.interpolate(grid.float(), size=tuple(new_grid), mode=mode, align_corners=False, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(position_embeddings.dtype)
    return torch.cat([prefix, grid], dim=1)


# --------------------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class ConformerModelOutput(BaseModelOutputWithPooling):
    r"""
    The base model's output: [`~modeling_outputs.BaseModelOutputWithPooling`] plus what merging did.

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, num_final_tokens, hidden_size)`):
            The final tokens after the last layer norm; fewer than the patches when merging is on.
        pooler_output (`None`):
            Not used: the classification model pools per `config.classifier`.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            The input of the first layer and the output of each layer, each with the tokens left there.
        attentions (`tuple(torch.FloatTensor)`, *optional*):
            Attention weights of each layer (needs `attn_implementation="eager"`).
        token_sizes (`torch.FloatTensor` of shape `(batch_size, num_final_tokens)`):
            How many original tokens (class token included) each final token stands for.
        source_map (`torch.LongTensor` of shape `(batch_size, 1 + num_patches)`):
            For each original token (class token first, then patches in raster order), the final token it joined.
    """

    token_sizes: torch.FloatTensor | None = None
    source_map: torch.LongTensor | None = None


@dataclass
class ConformerImageClassifierOutput(ImageClassifierOutput):
    r"""
    [`~modeling_outputs.ImageClassifierOutput`] plus, when `output_merge_info=True`, what merging did.

    Args:
        loss (`torch.FloatTensor` of shape `(1,)`, *optional*):
            Classification loss, when `labels` are given.
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
            Classification scores before softmax.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            As in [`ConformerModelOutput`].
        attentions (`tuple(torch.FloatTensor)`, *optional*):
            As in [`ConformerModelOutput`].
        token_sizes (`torch.FloatTensor` of shape `(batch_size, num_final_tokens)`, *optional*):
            As in [`ConformerModelOutput`].
        source_map (`torch.LongTensor` of shape `(batch_size, 1 + num_patches)`, *optional*):
            As in [`ConformerModelOutput`].
    """

    token_sizes: torch.FloatTensor | None = None
    source_map: torch.LongTensor | None = None


# --------------------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------------------


class ConformerPatchEmbeddings(nn.Module):
    """Pixels [batch, channels, height, width] to patch tokens [batch, patches, hidden]: one strided convolution, or for
    the hybrid a ResNet (transformers' `BitBackbone`, Google's R50 with weight-standardised convolutions and "same"
    padding) followed by a convolution over its feature map."""

    def __init__(self, config: ConformerConfig):
        super().__init__()
        self.num_channels = config.num_channels
        if config.backbone_depths:
            backbone_config = BitConfig(
                num_channels=config.num_channels,
                depths=config.backbone_depths,
                layer_type="bottleneck",
                global_padding="same",
                embedding_dynamic_padding=True,
                out_features=[f"stage{len(config.backbone_depths)}"],
            )
            self.backbone = BitBackbone(backbone_config)
            in_channels, kernel = self.backbone.channels[-1], config.patch_size // config.backbone_stride
        else:
            self.backbone = None
            in_channels, kernel = config.num_channels, config.patch_size
        self.projection = nn.Conv2d(
            in_channels, config.hidden_size, kernel_size=kernel, stride=kernel, bias=config.patch_embedding_bias
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.num_channels:
            raise ValueError(
                f"Expected pixel_values of shape (batch, {self.num_channels}, height, width), got "
                f"{tuple(pixel_values.shape)}: the model was configured for {self.num_channels} channels."
            )
        if pixel_values.shape[0] == 0:  # attention kernels cannot reshape an empty batch
            raise ValueError("pixel_values holds an empty batch (0 images); pass at least one image.")
        features = self.backbone(pixel_values).feature_maps[-1] if self.backbone is not None else pixel_values
        # [batch, patches, hidden]; a copy, not a view: FSDP2 warns about views a wrapped module returns
        return self.projection(features).flatten(2).transpose(1, 2).contiguous()


class ConformerEmbeddings(nn.Module):
    """Prefix tokens (class, distillation, registers) + patch embeddings + position embeddings (resampled for other
    resolutions on request, or always with `always_interpolate_position_embeddings`). Registers come after the class
    token and, as in DINOv2, without a position embedding."""

    def __init__(self, config: ConformerConfig):
        super().__init__()
        hidden = config.hidden_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden)) if config.class_token else None
        self.distillation_token = nn.Parameter(torch.zeros(1, 1, hidden)) if config.distillation_token else None
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, config.num_register_tokens, hidden)) if config.num_register_tokens else None
        )
        self.patch_embeddings = ConformerPatchEmbeddings(config)
        self.grid_size = config.image_size // config.patch_size
        self.num_position_prefix_tokens = config.num_position_prefix_tokens
        self.position_embeddings = nn.Parameter(
            torch.zeros(1, self.num_position_prefix_tokens + self.grid_size**2, hidden)
        )
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.config = config

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        batch, _, height, width = pixel_values.shape
        config = self.config
        embeddings = self.patch_embeddings(pixel_values)
        prefix = [t.expand(batch, -1, -1) for t in (self.cls_token, self.distillation_token) if t is not None]
        embeddings = torch.cat([*prefix, embeddings], dim=1)
        if interpolate_pos_encoding or config.always_interpolate_position_embeddings:
            new_grid = (height // config.patch_size, width // config.patch_size)
            position_embeddings = resample_position_embeddings(
                self.position_embeddings,
                new_grid,
                self.num_position_prefix_tokens,
                antialias=config.position_interpolation_antialias,
            )
        elif (height, width) != (config.image_size, config.image_size):
            raise ValueError(
                f"Input image size ({height}*{width}) doesn't match the model ({config.image_size}*"
                f"{config.image_size}); resize the images or pass `interpolate_pos_encoding=True`."
            )
        else:
            position_embeddings = self.position_embeddings
        embeddings = embeddings + position_embeddings
        if self.register_tokens is not None:
            registers = self.register_tokens.expand(batch, -1, -1)
            embeddings = torch.cat([embeddings[:, :1], registers, embeddings[:, 1:]], dim=1)
        return self.dropout(embeddings)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
):
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling  # [batch, heads, queries, keys]
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()  # [batch, queries, heads, head_dim]
    return attn_output, attn_weights


class ConformerAttention(nn.Module):
    """Multi-head self-attention that also returns its keys: averaged over heads, they are the merge metric."""

    def __init__(self, config: ConformerConfig):
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(
                f"`hidden_size` ({config.hidden_size}) must be divisible by `num_attention_heads` "
                f"({config.num_attention_heads})."
            )
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_probs_dropout_prob
        self.is_causal = False
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor, attention_bias: torch.Tensor | None = None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, self.num_heads, self.head_dim)  # explicit heads: an empty batch reshapes too
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [batch, heads, tokens, head_dim]
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_bias,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = self.o_proj(attn_output.reshape(*input_shape, self.num_heads * self.head_dim).contiguous())
        return attn_output, attn_weights, key  # key: [batch, heads, tokens, head_dim], the merge metric's source


class ConformerMLP(nn.Module):
    def __init__(self, config: ConformerConfig):
        super().__init__()
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class ConformerSwiGLU(nn.Module):
    """DINOv2's SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`, two thirds of the MLP width rounded up to 8."""

    def __init__(self, config: ConformerConfig):
        super().__init__()
        width = (int(config.intermediate_size * 2 / 3) + 7) // 8 * 8
        self.gate_proj = nn.Linear(config.hidden_size, width)
        self.up_proj = nn.Linear(config.hidden_size, width)
        self.down_proj = nn.Linear(width, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


class ConformerLayer(GradientCheckpointingLayer):
    """Pre-norm transformer block with token merging between attention and MLP.

    Token sizes and the source map travel with the hidden states; the layer keeps no state between calls.
    """

    def __init__(self, config: ConformerConfig, merge_r: int = 0):
        super().__init__()
        self.merge_mode, self.merge_r = config.merge_mode, merge_r
        self.proportional_attention = config.proportional_attention
        self.num_prefix_tokens, self.class_token = config.num_prefix_tokens, config.class_token
        self.attention = ConformerAttention(config)
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = ConformerSwiGLU(config) if config.mlp_type == "swiglu" else ConformerMLP(config)
        scale = config.layer_scale_init_value
        # DINOv2's layer scale: a learned per-channel factor on each residual branch.
        self.attention_scale = nn.Parameter(torch.full((config.hidden_size,), scale)) if scale is not None else None
        self.mlp_scale = nn.Parameter(torch.full((config.hidden_size,), scale)) if scale is not None else None
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_sizes: torch.Tensor | None = None,
        source_map: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ):
        attention_bias = None
        if self.proportional_attention and token_sizes is not None:
            # A key standing for s patches weighs as s copies of itself: add log(s) to its logits.
            attention_bias = token_sizes.log().to(hidden_states.dtype)[:, None, None, :, 0]  # [batch, 1, 1, keys]

        residual = hidden_states
        attn_output, _, key = self.attention(self.layernorm_before(hidden_states), attention_bias, **kwargs)
        if self.attention_scale is not None:
            attn_output = attn_output * self.attention_scale
        hidden_states = residual + self.dropout(attn_output)

        if self.merge_r > 0:
            metric = key.mean(dim=1)  # the keys averaged over heads, as ToMe: [batch, tokens, head_dim]
            merge, unmerge = match_tokens(
                self.merge_mode, metric, self.merge_r, token_sizes, self.num_prefix_tokens, self.class_token
            )
            hidden_states, token_sizes = merge_wavg(merge, hidden_states, token_sizes)
            if source_map is not None:
                source_map = merge_source(unmerge, source_map, hidden_states.shape[1])

        mlp_output = self.mlp(self.layernorm_after(hidden_states))
        if self.mlp_scale is not None:
            mlp_output = mlp_output * self.mlp_scale
        hidden_states = hidden_states + self.dropout(mlp_output)
        return hidden_states, token_sizes, source_map


@auto_docstring
class ConformerPreTrainedModel(PreTrainedModel):
    config: ConformerConfig
    config_class = ConformerConfig
    base_model_prefix = "conformer"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["ConformerEmbeddings", "ConformerLayer"]
    _supports_sdpa = True
    _supports_flash_attn = False  # the log-size bias needs an additive mask
    _supports_flex_attn = False  # the log-size bias through flex attention's score_mod is not safe on every build
    _supports_attention_backend = True
    _input_embed_layer = "patch_embeddings"
    _can_record_outputs = {
        "hidden_states": ConformerLayer,
        "attentions": ConformerAttention,
    }

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, ConformerEmbeddings):
            init.trunc_normal_(module.position_embeddings, mean=0.0, std=std)
            for token in (module.cls_token, module.distillation_token):
                if token is not None:
                    init.trunc_normal_(token, mean=0.0, std=std)
            if module.register_tokens is not None:
                init.zeros_(module.register_tokens)
        elif isinstance(module, ConformerLayer) and module.attention_scale is not None:
            init.constant_(module.attention_scale, self.config.layer_scale_init_value)
            init.constant_(module.mlp_scale, self.config.layer_scale_init_value)
        elif isinstance(module, ConformerAttentionPoolingHead):
            init.trunc_normal_(module.probe, mean=0.0, std=std)
            init.xavier_uniform_(module.attention.in_proj_weight)
            init.zeros_(module.attention.in_proj_bias)

    @classmethod
    def from_transformers(cls, model_or_path, attn_implementation: str | None = None, **config_overrides):
        """A Conformer with the weights of a model of transformers' ViT family (an object, a local folder or a Hub
        id): ViT, ViT-MSN, DeiT (also with its teacher head), DINOv2 (also with registers), the CLIP and SigLIP vision
        towers, I-JEPA. `from_transformers("facebook/dinov2-small", merge_mode="ward", merge_r=8)`. With merging off
        it returns what the source returns (`last_hidden_state`, `pooler_output`, `logits`). `image_size` resamples
        the position embeddings (bilinear, as timm's loader); another `num_labels` or `classifier` gets a new head
        with a zero classifier. The mapping lives in the `conformer-vit` package, not in Hub folders."""
        try:
            from conformer_vit.sources import from_transformers
        except ImportError as error:
            raise ImportError(
                f"from_transformers needs the conformer-vit package (pip install conformer-vit): {error}"
            ) from error
        return from_transformers(cls, model_or_path, attn_implementation=attn_implementation, **config_overrides)


class ConformerPooler(nn.Module):
    """ViT's and DeiT's pooler: a dense layer and tanh on the first token."""

    def __init__(self, config: ConformerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden_states[:, 0]))


class ConformerAttentionPoolingHead(nn.Module):
    """SigLIP's attention pooling: a learned probe attends over the final tokens, then a residual MLP. Over merged
    tokens the probe's attention gets the same `log(size)` bias as the layers (proportional attention)."""

    def __init__(self, config: ConformerConfig):
        super().__init__()
        self.probe = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.attention = nn.MultiheadAttention(config.hidden_size, config.num_attention_heads, batch_first=True)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = ConformerMLP(config)
        self.config = config

    def forward(self, hidden_states: torch.Tensor, token_sizes: torch.Tensor | None = None) -> torch.Tensor:
        probe = self.probe.expand(hidden_states.shape[0], -1, -1)
        bias = None
        if self.config.proportional_attention and token_sizes is not None:
            # [batch * heads, 1 query, keys], as nn.MultiheadAttention takes an additive float mask
            bias = token_sizes.log().to(hidden_states.dtype)[:, None, :]
            bias = bias.repeat_interleave(self.config.num_attention_heads, dim=0)
        pooled = self.attention(probe, hidden_states, hidden_states, attn_mask=bias)[0]
        pooled = pooled + self.mlp(self.layernorm(pooled))
        return pooled[:, 0]


@auto_docstring
class ConformerModel(ConformerPreTrainedModel):
    def __init__(self, config: ConformerConfig):
        super().__init__(config)
        # The effective config: `from_pretrained(..., merge_r=...)` sets overrides after the config was checked.
        config.validate_architecture()
        check_merge_schedule(
            config.merge_r_per_layer,
            config.num_hidden_layers,
            config.num_prefix_tokens + config.num_patches,
            config.merge_mode,
            config.num_prefix_tokens,
            where=f" at image_size={config.image_size}",
        )
        self.embeddings = ConformerEmbeddings(config)
        self.pre_layernorm = None
        if config.pre_layernorm:  # CLIP's norm before the first layer
            self.pre_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList([ConformerLayer(config, merge_r) for merge_r in config.merge_r_per_layer])
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pooler = ConformerPooler(config) if config.pooler == "dense_tanh" else None
        self.attention_pooler = ConformerAttentionPoolingHead(config) if config.pooler == "attention" else None
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    @auto_docstring
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ConformerModelOutput:
        if pixel_values is None:
            raise ValueError("`pixel_values` is required.")
        expected_dtype = self.embeddings.patch_embeddings.projection.weight.dtype
        hidden_states = self.embeddings(
            pixel_values.to(expected_dtype), interpolate_pos_encoding=bool(interpolate_pos_encoding)
        )
        if self.pre_layernorm is not None:
            hidden_states = self.pre_layernorm(hidden_states)

        batch, num_tokens, _ = hidden_states.shape
        merged_sizes = None  # [batch, tokens, 1]; None: all ones, until the first merge
        source_map = torch.arange(num_tokens, device=hidden_states.device).expand(batch, -1)
        for layer in self.layers:
            hidden_states, merged_sizes, source_map = layer(hidden_states, merged_sizes, source_map, **kwargs)

        if self.config.final_layernorm == "tokens":
            last_hidden_state = self.layernorm(hidden_states)
            class_token = last_hidden_state[:, 0]
        else:  # CLIP: only the pooled class token is normed
            last_hidden_state = hidden_states
            class_token = self.layernorm(hidden_states[:, 0])
        pooler_output = None
        if self.config.pooler == "dense_tanh":
            pooler_output = self.pooler(last_hidden_state)
        elif self.config.pooler == "class_token":
            pooler_output = class_token
        elif self.config.pooler == "attention":
            pooler_output = self.attention_pooler(
                last_hidden_state, merged_sizes[..., 0] if merged_sizes is not None else None
            )

        if merged_sizes is None:
            token_sizes = hidden_states.new_ones(hidden_states.shape[:2], dtype=torch.float32)
        else:
            token_sizes = merged_sizes[..., 0]
        return ConformerModelOutput(
            last_hidden_state=last_hidden_state,
            pooler_output=pooler_output,
            token_sizes=token_sizes,
            source_map=source_map,
        )


class ConformerCNNHead(nn.Module):
    """Lays the final tokens back on the patch grid through the source map (each patch takes its token's feature)
    and reads them with a small convolutional network: ViT globally, CNN locally."""

    def __init__(self, config: ConformerConfig):
        super().__init__()
        channels = config.cnn_head_channels
        self.layers = nn.Sequential(
            nn.Conv2d(config.hidden_size, channels, kernel_size=3, padding=1),
            nn.GroupNorm(1, channels),
            nn.GELU(),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
            nn.GroupNorm(1, channels),
            nn.GELU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )

    def forward(self, tokens: torch.Tensor, source_map: torch.LongTensor, grid: tuple[int, int]) -> torch.Tensor:
        patch_tokens = source_map[:, -grid[0] * grid[1] :]  # [batch, patches]: the final token of each patch
        patches = tokens.gather(1, patch_tokens[..., None].expand(-1, -1, tokens.shape[-1]))
        patches = patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[-1], *grid)  # [batch, hidden, h, w]
        return self.layers(patches)


@auto_docstring(
    custom_intro="""
    Conformer with an image classification head: the class token (`classifier="token"`), the size-weighted mean of the
    patch tokens (`"gap"`) or a small CNN over the tokens laid back on the patch grid (`"cnn"`).
    """
)
class ConformerForImageClassification(ConformerPreTrainedModel):
    def __init__(self, config: ConformerConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.conformer = ConformerModel(config)
        if config.classifier == "cnn":
            self.cnn_head = ConformerCNNHead(config)
            features = config.cnn_head_channels
        elif config.classifier == "token_gap":  # DINOv2: [class token, mean of the patch tokens]
            features = 2 * config.hidden_size
        else:
            features = config.hidden_size
        self.pre_logits = None
        if config.representation_size is not None:
            # The tanh "pre-logits" layer of Google's ImageNet-21k checkpoints.
            self.pre_logits = nn.Sequential(nn.Linear(features, config.representation_size), nn.Tanh())
            features = config.representation_size
        self.classifier = nn.Linear(features, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.distillation_classifier = None
        if config.classifier == "distilled":  # DeiT's teacher head: a second classifier on the distillation token
            self.distillation_classifier = (
                nn.Linear(features, config.num_labels) if config.num_labels > 0 else nn.Identity()
            )
        self.post_init()

    def forward_features(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool | None = None, **kwargs
    ) -> ConformerModelOutput:
        """The base model's output (final tokens, their sizes and the source map): timm's `forward_features`."""
        return self.conformer(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs)

    def pool(self, outputs: ConformerModelOutput, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """The feature vector the classifier reads, per `config.classifier` (the CNN head reads the patch grid of
        `pixel_values`; without them, that of `config.image_size`)."""
        config, tokens = self.config, outputs.last_hidden_state
        class_token = tokens[:, 0] if config.final_layernorm == "tokens" else self.conformer.layernorm(tokens[:, 0])
        num_prefix = config.num_prefix_tokens
        weights = outputs.token_sizes[:, num_prefix:, None]
        patch_mean = (tokens[:, num_prefix:].float() * weights).sum(1).div(weights.sum(1)).to(tokens.dtype)
        if config.classifier == "token":
            return class_token
        if config.classifier == "gap":
            return patch_mean
        if config.classifier == "token_gap":
            return torch.cat([class_token, patch_mean], dim=-1)
        if config.classifier == "distilled":
            return tokens[:, :2]  # [batch, 2 (class, distillation), hidden]
        height, width = pixel_values.shape[-2:] if pixel_values is not None else (self.config.image_size,) * 2
        grid = (height // self.config.patch_size, width // self.config.patch_size)
        return self.cnn_head(tokens, outputs.source_map, grid)

    def forward_head(
        self, outputs: ConformerModelOutput, pixel_values: torch.Tensor | None = None, pre_logits: bool = False
    ) -> torch.Tensor:
        """Logits from `forward_features`' output: pool, the optional tanh pre-logits layer, the classifier
        (`pre_logits=True`: the features before the classifier), as timm's `forward_head`."""
        features = self.pool(outputs, pixel_values)
        if self.pre_logits is not None:
            features = self.pre_logits(features)
        if pre_logits:
            return features
        if self.distillation_classifier is not None:
            return (self.classifier(features[:, 0]) + self.distillation_classifier(features[:, 1])) / 2
        return self.classifier(features)

    @can_return_tuple
    @auto_docstring
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        output_merge_info: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ConformerImageClassifierOutput:
        r"""
        output_merge_info (`bool`, defaults to `False`):
            Also return `token_sizes` and `source_map` (see [`ConformerModelOutput`]).
        """
        outputs = self.forward_features(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs)
        logits = self.forward_head(outputs, pixel_values)

        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config, **kwargs)
        return ConformerImageClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            token_sizes=outputs.token_sizes if output_merge_info else None,
            source_map=outputs.source_map if output_merge_info else None,
        )

    @classmethod
    def from_vit(cls, model_or_path, attn_implementation: str | None = None, **config_overrides):
        """`from_transformers` for transformers' ViT only (`ViTForImageClassification` or `ViTModel`): any other
        model is refused. `from_vit("google/vit-base-patch16-224", merge_mode="bipartite", merge_r=16)`."""
        if isinstance(model_or_path, nn.Module):
            if getattr(getattr(model_or_path, "config", None), "model_type", None) != "vit":
                raise TypeError(
                    f"from_vit expects a transformers ViTForImageClassification or ViTModel, got "
                    f"{type(model_or_path).__name__}; from_transformers takes the rest of the ViT family."
                )
        else:
            from transformers import AutoConfig

            model_type = AutoConfig.from_pretrained(model_or_path).model_type
            if model_type != "vit":
                raise ValueError(
                    f"{model_or_path!r} holds a {model_type!r} model; from_vit converts transformers' ViT ('vit') "
                    "only (from_transformers takes the rest of the ViT family)."
                )
        return cls.from_transformers(model_or_path, attn_implementation=attn_implementation, **config_overrides)


ConformerConfig.register_for_auto_class()
ConformerModel.register_for_auto_class("AutoModel")
ConformerForImageClassification.register_for_auto_class("AutoModelForImageClassification")

__all__ = [
    "ConformerForImageClassification",
    "ConformerModel",
    "ConformerPreTrainedModel",
    "resample_position_embeddings",
]
