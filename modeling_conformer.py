"""Conformer: a Vision Transformer whose tokens are merged between attention and MLP of each layer.

Everything the model needs sits in this file (and `configuration_conformer.py`), as the Hub's remote code
requires. Read top to bottom: the pure merge functions, then the modules in the order data flows through them.
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

try:  # inside a Hub folder (remote code) the two files are a package
    from .configuration_conformer import ConformerConfig
except ImportError:  # imported from the repository root or after `pip install`
    from configuration_conformer import ConformerConfig

logger = logging.get_logger(__name__)


# --------------------------------------------------------------------------------------------------------------------
# Token merging: pure functions. A matching function looks at a metric (the attention keys averaged over heads) and
# returns two closures: `merge` maps [batch, tokens, channels] to [batch, tokens - r, channels] and `unmerge` maps back,
# each original token receiving its group's value. Both are driven by one index, `destination[b, i]`: the output token
# that input token i joins. Kept tokens stay in their input order, so the class token stays first.
# --------------------------------------------------------------------------------------------------------------------


def _identity(x, mode=None):
    return x


def _merge_by_destination(destination: torch.LongTensor, num_out: int):
    """Build `(merge, unmerge)` from `destination` [batch, tokens], whose values cover 0..num_out-1."""

    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        index = destination[..., None].expand(-1, -1, x.shape[-1])
        out = x.new_zeros(x.shape[0], num_out, x.shape[-1])
        if mode not in ("sum", "mean"):  # "amax", "amin", "prod"
            return out.scatter_reduce(1, index, x, reduce=mode, include_self=False)
        # scatter_add_ is several times faster than scatter_reduce on CPU; the mean divides by the group sizes.
        out = out.scatter_add_(1, index, x)
        if mode == "mean":
            counts = x.new_zeros(x.shape[0], num_out).scatter_add_(1, destination, x.new_ones(destination.shape))
            out = out / counts[..., None]
        return out

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        return x.gather(1, destination[..., None].expand(-1, -1, x.shape[-1]))

    return merge, unmerge


def max_merge_r(num_tokens: int, mode: str, protect_cls: bool = True) -> int:
    """The most tokens one call of `mode`'s matching can remove from `num_tokens` (class token included)."""
    if mode == "bipartite":
        # Only tokens of set A (even positions) can go, and the class token, if protected, is one of them.
        return (num_tokens + 1) // 2 - int(protect_cls)
    if mode in ("submodular", "ward"):
        # Keep the class token (if protected) and at least one other token.
        return num_tokens - 1 - int(protect_cls)
    return 0


def merge_schedule(merge_r, num_tokens: int, num_layers: int, modes=("bipartite",)) -> list[int]:
    """Tokens removed per layer: `merge_r` (one int for every layer, or one per layer) lowered wherever a layer has too
    few tokens left for every mode in `modes` (ToMe's rule). Comparing the result with the request tells whether a
    schedule fits; the token counts layer by layer are `num_tokens` minus its running sum."""
    requested = list(merge_r) if isinstance(merge_r, (list, tuple)) else [merge_r] * num_layers
    schedule = []
    for r in requested:
        limit = min((max_merge_r(num_tokens, mode) for mode in modes), default=0)
        schedule.append(max(0, min(r, limit)))
        num_tokens -= schedule[-1]
    return schedule


def _check_merge_r(r: int, num_tokens: int, mode: str, protect_cls: bool):
    limit = max_merge_r(num_tokens, mode, protect_cls)
    if not 0 <= r <= limit:
        raise ValueError(
            f"{mode} matching cannot remove r={r} of {num_tokens} tokens: it removes between 0 and {limit} there"
            f"{' (the class token is kept)' if protect_cls else ''}. Lower `merge_r` for this layer."
        )


def bipartite_soft_matching(metric: torch.Tensor, r: int, protect_cls: bool = True):
    """ToMe's bipartite soft matching (Bolya et al., ICLR 2023, section 3).

    Tokens alternate into set A (even positions, so the class token is in A) and set B (odd positions). Each A token
    keeps its most similar B token (cosine similarity of `metric` [batch, tokens, channels]); the r A tokens with the
    most similar partners merge into them (several may land on one B token). The output is the kept A tokens in input
    order, then all B tokens: ToMe's order with a protected class token, so later layers split as ToMe's do.
    """
    batch, num_tokens, _ = metric.shape
    _check_merge_r(r, num_tokens, "bipartite", protect_cls)
    if r == 0:
        return _identity, _identity
    with torch.no_grad():
        metric = metric.float()
        metric = metric / metric.norm(dim=-1, keepdim=True)
        set_a, set_b = metric[:, ::2], metric[:, 1::2]
        scores = set_a @ set_b.transpose(-1, -2)  # [batch, |A|, |B|]
        if protect_cls:
            scores[:, 0, :] = -math.inf
        best_score, best_b = scores.max(dim=-1)  # [batch, |A|]
        edge_order = best_score.argsort(dim=-1, descending=True)
        merged_a, kept_a = edge_order[:, :r], edge_order[:, r:].sort(dim=-1).values
        num_kept_a = kept_a.shape[1]

        # Where each token goes: kept A tokens to 0..num_kept_a-1, B tokens after them, merged A tokens to their B.
        destination_a = torch.empty_like(best_b)
        destination_a.scatter_(1, kept_a, torch.arange(num_kept_a, device=metric.device).expand(batch, -1))
        destination_a.scatter_(1, merged_a, num_kept_a + best_b.gather(1, merged_a))
        destination_b = num_kept_a + torch.arange(set_b.shape[1], device=metric.device).expand(batch, -1)
        destination = torch.empty(batch, num_tokens, dtype=torch.long, device=metric.device)
        destination[:, ::2], destination[:, 1::2] = destination_a, destination_b
    return _merge_by_destination(destination, num_tokens - r)


def _unit_vectors_and_weights(metric: torch.Tensor, size: torch.Tensor | None):
    """Unit-length metric vectors [batch, tokens, channels] and token weights [batch, tokens], both float32."""
    unit = F.normalize(metric.float().nan_to_num(0.0, 0.0, 0.0), dim=-1)  # NaN/inf keys (a diverged run): zero
    if size is None:
        return unit, unit.new_ones(unit.shape[:2])
    return unit, size.float().reshape(unit.shape[:2])


def _destination_from_owner(owner: torch.LongTensor, kept: torch.BoolTensor) -> torch.LongTensor:
    """`owner[b, i]`: the kept token that token i joins (itself if kept). Output k is the k-th kept token."""
    output_index = kept.long().cumsum(dim=-1) - 1
    return output_index.gather(1, owner)


def submodular_matching(
    metric: torch.Tensor, r: int, size: torch.Tensor | None = None, protect_cls: bool = True, max_rounds: int = 3
):
    """Keep the tokens that best represent all others, merge each removed token into its most similar kept one.

    The kept set S approximately maximises the facility-location objective
    `F(S) = sum_j size_j * max_{i in S} cos(metric_i, metric_j)`: every token is represented by its most similar kept
    token, weighted by how many patches it already stands for (`size` [batch, tokens, 1]; None: all ones). Any token
    may absorb any other, so groups follow the content instead of a fixed A/B split.

    Reverse greedy (remove the token whose loss is smallest) in at most `max_rounds` batched rounds, not r sequential
    steps. Each round computes the exact marginal loss of removing each kept token i,
    `loss_i = sum_{j represented by i} size_j * (cos(j, i) - cos(j, second kept choice of j))`,
    and removes the cheapest tokens that do not conflict: among the cheapest 2 * (still to remove) candidates, a token
    goes only if it ranks before the token it would join and before every candidate that would join it. That stops
    two near-duplicates (each cheap because the other covers it) from leaving together, and a token from leaving with
    its destination. Rounds repeat, with the losses recomputed, until r tokens are gone; the last allowed round fills up
    with the cheapest remaining candidates so that exactly r go. Most calls need one or two rounds.
    """
    batch, num_tokens, _ = metric.shape
    _check_merge_r(r, num_tokens, "submodular", protect_cls)
    if r == 0:
        return _identity, _identity
    with torch.no_grad():
        unit, weight = _unit_vectors_and_weights(metric, size)
        similarity = unit @ unit.transpose(-1, -2)  # [batch, tokens, tokens] cosine
        similarity.diagonal(dim1=-2, dim2=-1).fill_(1.0)  # a kept token represents itself exactly
        positions = torch.arange(num_tokens, device=metric.device)
        kept = torch.ones(batch, num_tokens, dtype=torch.bool, device=metric.device)
        removable = kept.clone()
        if protect_cls:
            removable[:, 0] = False
            similarity[:, 1:, 0] = -math.inf  # the class token neither represents nor absorbs another token
        still_to_remove = torch.full((batch, 1), r, device=metric.device)
        beyond_every_rank = torch.full((batch, num_tokens), num_tokens, device=metric.device)

        def similarity_to_kept():
            # An additive -inf column for removed tokens: on CPU much cheaper than a boolean mask of the matrix.
            return similarity + weight.new_zeros(batch, num_tokens).masked_fill_(~kept, -math.inf)[:, None, :]

        for round_index in range(max_rounds):
            to_kept = similarity_to_kept()
            best, representative = to_kept.max(dim=-1)  # each token's most similar kept token (itself if kept)
            second, second_choice = to_kept.scatter_(2, representative[..., None], -math.inf).max(dim=-1)
            loss = torch.zeros_like(weight).scatter_add_(1, representative, weight * (best - second))
            candidate = kept & removable
            loss = loss.masked_fill(~candidate, math.inf)
            order = loss.argsort(dim=-1)  # cheapest first
            rank = torch.empty_like(order).scatter_(1, order, positions.expand(batch, -1))
            in_pool = candidate & (rank < (2 * still_to_remove))
            joins = torch.where(representative == positions, second_choice, representative)  # where i would go
            pool_rank = torch.where(in_pool, rank, beyond_every_rank)
            first_rank_joining = beyond_every_rank.scatter_reduce(1, joins, pool_rank, reduce="amin")
            accepted = in_pool & (pool_rank < pool_rank.gather(1, joins)) & (pool_rank < first_rank_joining)

            accepted_by_cost = accepted.gather(1, order)
            removed_by_cost = accepted_by_cost & (accepted_by_cost.long().cumsum(dim=-1) <= still_to_remove)
            if round_index == max_rounds - 1:
                others = candidate.gather(1, order) & ~removed_by_cost
                missing = still_to_remove - removed_by_cost.sum(dim=-1, keepdim=True)
                removed_by_cost |= others & (others.long().cumsum(dim=-1) <= missing)
            removed = torch.zeros_like(kept).scatter_(1, order, removed_by_cost)
            kept &= ~removed
            still_to_remove = still_to_remove - removed.sum(dim=-1, keepdim=True)  # rounds after 0 remove nothing

        owner = torch.where(kept, positions, similarity_to_kept().max(dim=-1).indices)
        destination = _destination_from_owner(owner, kept)
    return _merge_by_destination(destination, num_tokens - r)


def _fallback_rounds(num_groups: int, r: int) -> int:
    """Rounds in which every group may join its nearest that guarantee r merges: each such round leaves at most half
    of the groups (every chain of nearest groups ends in a mutual pair, whose heavier group stays)."""
    remaining, rounds = num_groups, 0
    while num_groups - remaining < r:  # r < num_groups, so `remaining` reaches 1 at the latest
        remaining, rounds = remaining // 2, rounds + 1
    return rounds


def ward_matching(
    metric: torch.Tensor, r: int, size: torch.Tensor | None = None, protect_cls: bool = True, max_rounds: int = 12
):
    """Ward's agglomerative clustering of the tokens down to N - r groups, in a fixed number of batched rounds.

    Joining groups P and Q (sizes w, centroids c of the unit metric vectors) adds exactly
    `w_P * w_Q / (w_P + w_Q) * ||c_P - c_Q||^2` to the size-weighted scatter of the merged tokens, so Ward's greedy
    merge is greedy on the information a merge throws away. Ward's cost is reducible, so all mutual-nearest pairs can
    merge at once and the merge tree (with its costs) stays that of sequential Ward; costs only grow up the tree, so the
    r cheapest merges are Ward's cut at N - r groups. Each round merges every mutual pair (the lighter group into the
    heavier) and records parent and cost. Once r recorded merges cost no more than the cheapest merge still possible,
    the cut is exact and that image records no more merges. An image still short of r merges after `max_rounds`
    rounds lets every group join its nearest (chains of nearest groups end in a mutual pair, so the joins form a
    tree) in as many rounds as guarantee r merges, and those merges are taken only to fill up.

    The number of rounds depends on r and the token count only, and nothing branches on the data: one graph for
    `torch.compile(fullgraph=True)`, `torch.export` and ONNX, no host sync on a GPU, and NaN or inf keys (zeroed)
    cannot stop it from ending.
    """
    batch, num_tokens, channels = metric.shape
    _check_merge_r(r, num_tokens, "ward", protect_cls)
    if r == 0:
        return _identity, _identity
    num_rounds = max(max_rounds, 1) - 1 + max(1, _fallback_rounds(num_tokens - int(protect_cls), r))
    with torch.no_grad():
        unit, weight = _unit_vectors_and_weights(metric, size)
        positions = torch.arange(num_tokens, device=metric.device)
        # Groups never move: group i is the one whose first token is i. `parent`: the group i merged into.
        parent = positions.expand(batch, -1).clone()
        merge_cost = torch.full_like(weight, math.inf)  # the Ward cost of that merge
        filler = torch.zeros_like(weight, dtype=torch.bool)  # merges made only to reach r
        centroid, group_weight = unit, weight
        live = torch.ones_like(filler)
        if protect_cls:
            live[:, 0] = False  # the class token neither joins nor takes in a group
        exact = torch.zeros_like(filler[:, :1])
        for round_index in range(num_rounds):
            filling = round_index >= max_rounds - 1
            # Ward cost of joining groups i and j: ||c_i - c_j||^2 / (1/w_i + 1/w_j)  [batch, groups, groups]
            squared_norm = (centroid * centroid).sum(-1).masked_fill(~live, math.inf)
            cost = torch.baddbmm(
                squared_norm[:, :, None] + squared_norm[:, None, :], centroid, centroid.transpose(-1, -2), alpha=-2
            )
            inverse_weight = 1.0 / group_weight
            cost = cost.div_(inverse_weight[:, :, None] + inverse_weight[:, None, :])
            cost.diagonal(dim1=-2, dim2=-1).fill_(math.inf)
            best_cost, nearest = cost.min(dim=-1)
            second_cost = cost.scatter_(2, nearest[..., None], math.inf).amin(dim=-1)
            can_join = live & best_cost.isfinite()
            mutual = can_join & (nearest.gather(1, nearest) == positions)
            nearest_weight = group_weight.gather(1, nearest)
            lighter = (group_weight < nearest_weight) | ((group_weight == nearest_weight) & (positions > nearest))
            joins = mutual & lighter  # one group of each mutual pair joins the other
            if filling:
                joins = joins | (can_join & ~mutual)
            joins &= ~exact
            if filling:  # after the first filling round no merge is Ward's any more
                filler |= joins if round_index >= max_rounds else joins & ~mutual
            merge_cost = torch.where(joins, best_cost, merge_cost)
            parent = torch.where(joins, nearest, parent)
            # No later merge can cost less than the cheapest cost left after this round.
            lower_bound = torch.where(mutual, second_cost, best_cost).masked_fill(~live, math.inf).amin(-1, True)
            exact |= ((merge_cost <= lower_bound) & ~filler).sum(-1, keepdim=True) >= r

            # Each joining group's weight and weighted centroid go to the group it ends in.
            target = torch.where(joins, nearest, positions)
            if filling:  # joins may chain there
                for _ in range(num_tokens.bit_length()):
                    target = target.gather(1, target)
            moved_weight = group_weight * joins
            taken_weight = torch.zeros_like(group_weight).scatter_add_(1, target, moved_weight)
            taken_sum = torch.zeros_like(centroid).scatter_add_(
                1, target[..., None].expand(-1, -1, channels), moved_weight[..., None] * centroid
            )
            new_weight = group_weight + taken_weight
            merged_centroid = (group_weight[..., None] * centroid + taken_sum) / new_weight[..., None]
            centroid = torch.where(joins[..., None], centroid, merged_centroid)
            group_weight = torch.where(joins, group_weight, new_weight)
            live &= ~joins

        # The r cheapest recorded merges, those made only to reach r last (no Ward cost is above 4 * total weight).
        priority = merge_cost + filler * (4 * weight.sum(-1, keepdim=True))
        merged = torch.zeros_like(filler).scatter_(1, priority.topk(r, dim=-1, largest=False).indices, True)
        owner = torch.where(merged, parent, positions)
        for _ in range(num_tokens.bit_length()):  # pointer jumping: follow chains of merges to their kept token
            owner = owner.gather(1, owner)
        destination = _destination_from_owner(owner, ~merged)
    return _merge_by_destination(destination, num_tokens - r)


def merge_wavg(merge: Callable, x: torch.Tensor, size: torch.Tensor | None = None):
    """Merge `x` [batch, tokens, channels] into size-weighted means; returns the merged `x` and the summed `size`.

    The weighted sum runs in float32: in fp16 a feature times a size of a hundred patches can overflow.
    """
    if size is None:
        size = torch.ones_like(x[..., :1], dtype=torch.float32)
    weighted = merge(x.float() * size, mode="sum")
    size = merge(size, mode="sum")
    return (weighted / size).to(x.dtype), size


def merge_source(unmerge: Callable, source_map: torch.LongTensor, num_tokens_after: int) -> torch.LongTensor:
    """Follow each original token (`source_map` [batch, original tokens]: its current token) through one merge."""
    token_index = torch.arange(num_tokens_after, device=source_map.device)
    token_index = token_index[None, :, None].expand(source_map.shape[0], -1, 1)
    destination = unmerge(token_index)[..., 0]  # [batch, tokens before]: the token each one joined
    return destination.gather(1, source_map)


MATCHING_FUNCTIONS = {
    "bipartite": lambda metric, r, size: bipartite_soft_matching(metric, r),
    "submodular": lambda metric, r, size: submodular_matching(metric, r, size),
    "ward": lambda metric, r, size: ward_matching(metric, r, size),
}


def resample_position_embeddings(
    position_embeddings: torch.Tensor, new_grid: tuple[int, int], num_prefix_tokens: int = 1, mode: str = "bicubic"
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
    grid = F.interpolate(grid.float(), size=tuple(new_grid), mode=mode, align_corners=False, antialias=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(position_embeddings.dtype)
    return torch.cat([prefix, grid], dim=1)


HEAD_PREFIXES = ("classifier.", "pre_logits.", "cnn_head.")


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
            value = resample_position_embeddings(value, (grid, grid), mode=mode)
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
                fresh = key.startswith("classifier.") and value.is_floating_point()
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
        self.projection = nn.Conv2d(in_channels, config.hidden_size, kernel_size=kernel, stride=kernel)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.num_channels:
            raise ValueError(
                f"Expected pixel_values of shape (batch, {self.num_channels}, height, width), got "
                f"{tuple(pixel_values.shape)}: the model was configured for {self.num_channels} channels."
            )
        if pixel_values.shape[0] == 0:  # attention kernels cannot reshape an empty batch
            raise ValueError("pixel_values holds an empty batch (0 images); pass at least one image.")
        features = self.backbone(pixel_values).feature_maps[-1] if self.backbone is not None else pixel_values
        return self.projection(features).flatten(2).transpose(1, 2)  # [batch, patches, hidden]


class ConformerEmbeddings(nn.Module):
    """Class token + patch embeddings + position embeddings (resampled for other resolutions on request)."""

    def __init__(self, config: ConformerConfig):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.patch_embeddings = ConformerPatchEmbeddings(config)
        self.grid_size = config.image_size // config.patch_size
        self.position_embeddings = nn.Parameter(torch.zeros(1, 1 + self.grid_size**2, config.hidden_size))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.patch_size = config.patch_size
        self.image_size = config.image_size

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        batch, _, height, width = pixel_values.shape
        patches = self.patch_embeddings(pixel_values)
        embeddings = torch.cat([self.cls_token.expand(batch, -1, -1), patches], dim=1)
        if interpolate_pos_encoding:
            new_grid = (height // self.patch_size, width // self.patch_size)
            position_embeddings = resample_position_embeddings(self.position_embeddings, new_grid)
        elif (height, width) != (self.image_size, self.image_size):
            raise ValueError(
                f"Input image size ({height}*{width}) doesn't match the model ({self.image_size}*{self.image_size}); "
                "resize the images or pass `interpolate_pos_encoding=True`."
            )
        else:
            position_embeddings = self.position_embeddings
        return self.dropout(embeddings + position_embeddings)


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
    """Multi-head self-attention that also returns its keys averaged over heads: the merge metric."""

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
        return attn_output, attn_weights, key.mean(dim=1)  # metric: [batch, tokens, head_dim]


class ConformerMLP(nn.Module):
    def __init__(self, config: ConformerConfig):
        super().__init__()
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class ConformerLayer(GradientCheckpointingLayer):
    """Pre-norm transformer block with token merging between attention and MLP.

    Token sizes and the source map travel with the hidden states; the layer keeps no state between calls.
    """

    def __init__(self, config: ConformerConfig):
        super().__init__()
        self.attention = ConformerAttention(config)
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = ConformerMLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.config = config  # merge_mode and proportional_attention are read at call time, so they can be switched

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_sizes: torch.Tensor | None = None,
        source_map: torch.LongTensor | None = None,
        merge_r: int = 0,
        **kwargs: Unpack[TransformersKwargs],
    ):
        attention_bias = None
        if self.config.proportional_attention and token_sizes is not None:
            # A key standing for s patches weighs as s copies of itself: add log(s) to its logits.
            attention_bias = token_sizes.log().to(hidden_states.dtype)[:, None, None, :, 0]  # [batch, 1, 1, keys]

        residual = hidden_states
        attn_output, _, metric = self.attention(self.layernorm_before(hidden_states), attention_bias, **kwargs)
        hidden_states = residual + self.dropout(attn_output)

        if merge_r > 0:
            merge, unmerge = MATCHING_FUNCTIONS[self.config.merge_mode](metric, merge_r, token_sizes)
            hidden_states, token_sizes = merge_wavg(merge, hidden_states, token_sizes)
            if source_map is not None:
                source_map = merge_source(unmerge, source_map, hidden_states.shape[1])

        hidden_states = hidden_states + self.dropout(self.mlp(self.layernorm_after(hidden_states)))
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
    # Not declared: transformers' flex path reads an additive mask through a score_mod that captures it, and on the
    # CPU build of torch 2.14 such a score_mod corrupts the heap (the proportional-attention bias needs one).
    _supports_flex_attn = False
    _supports_attention_backend = True
    _input_embed_layer = "patch_embeddings"
    _can_record_outputs = {
        "hidden_states": ConformerLayer,
        "attentions": ConformerAttention,
    }

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, ConformerEmbeddings):
            init.trunc_normal_(module.position_embeddings, mean=0.0, std=self.config.initializer_range)
            init.trunc_normal_(module.cls_token, mean=0.0, std=self.config.initializer_range)


def check_merge_schedule(config: ConformerConfig, num_patches: int | None = None):
    """Raise `ValueError` if some layer's r exceeds what its merge mode can remove from the tokens left there."""
    num_tokens = 1 + (config.num_patches if num_patches is None else num_patches)
    requested = config.merge_r_per_layer
    fitted = merge_schedule(requested, num_tokens, config.num_hidden_layers, modes=(config.merge_mode,))
    for layer, (r, limit) in enumerate(zip(requested, fitted)):
        if r > limit:
            raise ValueError(
                f"`merge_r` asks layer {layer} to remove {r} tokens, but {config.merge_mode} matching can remove at "
                f"most {limit} of the {num_tokens - sum(fitted[:layer])} tokens left there at "
                f"image_size={config.image_size}; lower `merge_r`."
            )


@auto_docstring
class ConformerModel(ConformerPreTrainedModel):
    def __init__(self, config: ConformerConfig):
        super().__init__(config)
        # The effective config: `from_pretrained(..., merge_r=...)` sets overrides after the config was checked.
        config.validate_architecture()
        check_merge_schedule(config)
        self.embeddings = ConformerEmbeddings(config)
        self.layers = nn.ModuleList([ConformerLayer(config) for _ in range(config.num_hidden_layers)])
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
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

        batch, num_tokens, _ = hidden_states.shape
        token_sizes = None  # all ones until the first merge
        source_map = torch.arange(num_tokens, device=hidden_states.device).expand(batch, -1)
        for layer, merge_r in zip(self.layers, self.config.merge_r_per_layer):
            hidden_states, token_sizes, source_map = layer(
                hidden_states, token_sizes, source_map, merge_r=merge_r, **kwargs
            )

        if token_sizes is None:
            token_sizes = hidden_states.new_ones(hidden_states.shape[:2], dtype=torch.float32)
        else:
            token_sizes = token_sizes[..., 0]
        return ConformerModelOutput(
            last_hidden_state=self.layernorm(hidden_states), token_sizes=token_sizes, source_map=source_map
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
        patch_tokens = source_map[:, 1:]  # [batch, patches]: the final token of each patch
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
        else:
            features = config.hidden_size
        self.pre_logits = None
        if config.representation_size is not None:
            # The tanh "pre-logits" layer of Google's ImageNet-21k checkpoints.
            self.pre_logits = nn.Sequential(nn.Linear(features, config.representation_size), nn.Tanh())
            features = config.representation_size
        self.classifier = nn.Linear(features, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    def forward_features(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool | None = None, **kwargs
    ) -> ConformerModelOutput:
        """The base model's output (final tokens, their sizes and the source map): timm's `forward_features`."""
        return self.conformer(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs)

    def pool(self, outputs: ConformerModelOutput, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """The feature vector the classifier reads, per `config.classifier` (the CNN head reads the patch grid of
        `pixel_values`; without them, that of `config.image_size`)."""
        tokens = outputs.last_hidden_state
        if self.config.classifier == "token":
            return tokens[:, 0]
        if self.config.classifier == "gap":
            weights = outputs.token_sizes[:, 1:, None]
            return (tokens[:, 1:].float() * weights).sum(1).div(weights.sum(1)).to(tokens.dtype)
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
        return features if pre_logits else self.classifier(features)

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
        """A Conformer with the weights of a transformers `ViTForImageClassification` or `ViTModel` (an object, a
        local folder or a Hub id), so that any ViT gets token merging: `from_vit("google/vit-base-patch16-224",
        merge_mode="bipartite", merge_r=16)`. With merging off, its logits equal the ViT's. `image_size` resamples
        the position embeddings (bilinear, as timm's loader); another `num_labels` or `classifier` gets a new head
        with a zero classifier."""
        from transformers import AutoConfig, ViTForImageClassification, ViTModel

        if isinstance(model_or_path, nn.Module):
            vit = model_or_path
            if not isinstance(vit, (ViTForImageClassification, ViTModel)):
                raise TypeError(
                    f"from_vit expects a transformers ViTForImageClassification or ViTModel, got {type(vit).__name__}."
                )
        else:
            model_type = AutoConfig.from_pretrained(model_or_path).model_type
            if model_type != "vit":
                raise ValueError(
                    f"{model_or_path!r} holds a {model_type!r} model; from_vit converts transformers' ViT ('vit') only."
                )
            vit = ViTForImageClassification.from_pretrained(model_or_path, attn_implementation=attn_implementation)
        vit_config = vit.config
        has_head = isinstance(getattr(vit, "classifier", None), nn.Linear)
        fields = dict(
            hidden_size=vit_config.hidden_size,
            num_hidden_layers=vit_config.num_hidden_layers,
            num_attention_heads=vit_config.num_attention_heads,
            intermediate_size=vit_config.intermediate_size,
            hidden_act=vit_config.hidden_act,
            hidden_dropout_prob=vit_config.hidden_dropout_prob,
            attention_probs_dropout_prob=vit_config.attention_probs_dropout_prob,
            initializer_range=vit_config.initializer_range,
            layer_norm_eps=vit_config.layer_norm_eps,
            image_size=vit_config.image_size,
            patch_size=vit_config.patch_size,
            num_channels=vit_config.num_channels,
            qkv_bias=vit_config.qkv_bias,
        )
        num_labels = config_overrides.get("num_labels", vit_config.num_labels if has_head else 0)
        if num_labels == vit_config.num_labels and "id2label" not in config_overrides:
            fields.update(id2label=dict(vit_config.id2label), label2id=dict(vit_config.label2id))
        config = ConformerConfig(**{**fields, **config_overrides, "num_labels": num_labels})
        model = cls._from_config(config, attn_implementation=attn_implementation)
        # Same submodule names below the base model; only the prefix differs.
        state_dict = {
            key.replace(f"{vit.base_model_prefix}.", f"{cls.base_model_prefix}.", 1): value
            for key, value in vit.state_dict().items()
        }
        if isinstance(vit, ViTModel):
            state_dict = {f"{cls.base_model_prefix}.{key}": value for key, value in state_dict.items()}
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith(f"{cls.base_model_prefix}.pooler.")}
        model.load_state_dict(adapt_state_dict(state_dict, model), strict=True)
        return model.to(next(vit.parameters()).dtype)


ConformerConfig.register_for_auto_class()
ConformerModel.register_for_auto_class("AutoModel")
ConformerForImageClassification.register_for_auto_class("AutoModelForImageClassification")

__all__ = [
    "ConformerForImageClassification",
    "ConformerModel",
    "ConformerPreTrainedModel",
    "bipartite_soft_matching",
    "merge_source",
    "merge_wavg",
    "resample_position_embeddings",
    "submodular_matching",
    "ward_matching",
]
