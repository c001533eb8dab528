"""Conformer: a Vision Transformer whose tokens are merged between attention and MLP of each layer.

Everything the model needs sits in this file (and `configuration_conformer.py`), as the Hub's remote code
requires. Read top to bottom: the pure merge functions, then the modules in the order data flows through them.
"""

import math
import re
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


def _flat_rows(index: torch.LongTensor, rows_per_image: int) -> torch.LongTensor:
    """`index` [batch, n] of rows within each image, as one index [batch * n] into the batch's rows flattened to
    [batch * rows_per_image]. `index_add_`/`index_select` on it move whole channel rows, several times faster on a CPU
    than `scatter_add_`/`gather` along dim 1 with an index expanded over the channels."""
    offsets = rows_per_image * torch.arange(index.shape[0], device=index.device)[:, None]
    return (index + offsets).reshape(-1)


def _merge_by_destination(destination: torch.LongTensor, num_out: int):
    """Build `(merge, unmerge)` from `destination` [batch, tokens], whose values cover 0..num_out-1."""
    batch, num_tokens = destination.shape
    flat_destination = _flat_rows(destination, num_out)  # [batch * tokens] into [batch * num_out]

    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        channels = x.shape[-1]
        if mode not in ("sum", "mean"):  # "amax", "amin", "prod"
            index = destination[..., None].expand(-1, -1, channels)
            out = x.new_zeros(batch, num_out, channels)
            return out.scatter_reduce(1, index, x, reduce=mode, include_self=False)
        out = x.new_zeros(batch * num_out, channels).index_add_(0, flat_destination, x.reshape(-1, channels))
        out = out.view(batch, num_out, channels)
        if mode == "mean":
            counts = x.new_zeros(batch * num_out).index_add_(0, flat_destination, x.new_ones(batch * num_tokens))
            out = out / counts.view(batch, num_out, 1)
        return out

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[-1]
        return x.reshape(-1, channels).index_select(0, flat_destination).view(batch, num_tokens, channels)

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


def merge_schedule(
    merge_r, num_tokens: int, num_layers: int, modes=("bipartite",), num_prefix_tokens: int = 1
) -> list[int]:
    """Tokens removed per layer: `merge_r` (one int for every layer, or one per layer) lowered wherever a layer has too
    few tokens left for every mode in `modes` (ToMe's rule). Comparing the result with the request tells whether a
    schedule fits; the token counts layer by layer are `num_tokens` minus its running sum. Of the `num_prefix_tokens`
    (which never merge) the first is protected inside the matching, the others are kept out of it."""
    requested = list(merge_r) if isinstance(merge_r, (list, tuple)) else [merge_r] * num_layers
    num_extra, protect_cls = max(num_prefix_tokens - 1, 0), num_prefix_tokens > 0
    schedule = []
    for r in requested:
        limit = min((max_merge_r(num_tokens - num_extra, mode, protect_cls) for mode in modes), default=0)
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


def _destination_of_merges(merged: torch.BoolTensor, parent: torch.LongTensor) -> torch.LongTensor:
    """Each merged token goes to its `parent`; chains of merges are followed (pointer jumping) to their kept token."""
    positions = torch.arange(merged.shape[1], device=merged.device)
    owner = torch.where(merged, parent, positions)
    for _ in range(merged.shape[1].bit_length()):
        owner = owner.gather(1, owner)
    return _destination_from_owner(owner, ~merged)


def submodular_matching(
    metric: torch.Tensor, r: int, size: torch.Tensor | None = None, protect_cls: bool = True, max_rounds: int = 2
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
    with the cheapest remaining candidates so that exactly r go. Two rounds (the default) leave as little scatter as
    three on clustered keys (r = 8-48, three seeds), one round cheaper.
    """
    batch, num_tokens, _ = metric.shape
    _check_merge_r(r, num_tokens, "submodular", protect_cls)
    if r == 0:
        return _identity, _identity
    with torch.no_grad():
        unit, weight = _unit_vectors_and_weights(metric, size)
        similarity = unit @ unit.transpose(-1, -2)  # [batch, tokens, tokens] cosine
        similarity = (similarity + similarity.transpose(-1, -2)) / 2  # exactly symmetric in every runtime
        # A kept token represents itself exactly (a mask, not an in-place diagonal view, which ONNX cannot take).
        similarity = similarity.masked_fill_(torch.eye(num_tokens, dtype=torch.bool, device=metric.device), 1.0)
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
            # Cheapest first. Float32 cosines near 1 make exact ties common: break them by position, so that every
            # runtime keeps the same tokens (ONNX has no stable sort). Later tokens go first: earliest-first measured
            # 0.46 accuracy against 0.73 in the digits end-to-end training test (tests/test_training.py).
            order = (loss.double() - positions * 1e-12).argsort(dim=-1)
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
    metric: torch.Tensor,
    r: int,
    size: torch.Tensor | None = None,
    protect_cls: bool = True,
    max_rounds: int = 1,
    refine: bool = True,
):
    """Ward's agglomerative clustering of the tokens down to N - r groups, in a fixed number of batched rounds.

    Joining groups P and Q (sizes w, centroids c of the unit metric vectors) adds exactly
    `w_P * w_Q / (w_P + w_Q) * ||c_P - c_Q||^2` to the size-weighted scatter of the merged tokens, so Ward's greedy
    merge is greedy on the information a merge throws away. Ward's cost is reducible, so all mutual-nearest pairs can
    merge at once and the merge tree (with its costs) stays that of sequential Ward; costs only grow up the tree, so the
    r cheapest merges are Ward's cut at N - r groups. Each round merges every mutual pair (the lighter group into the
    heavier) and records parent and cost. Once r recorded merges cost no more than the cheapest merge still possible,
    the cut is exact and that image records no more merges (`max_rounds=20` reaches it on nearly every input).

    Each round costs one N x N matrix, so by default one round runs (`max_rounds=1`), then `refine`: every group that
    merged nowhere records a merge into the group its nearest ended in, at the Ward cost against that group's new
    centroid, as a second round would price it; the r cheapest of all recorded merges are taken. Where many tokens
    share one nearest (a hub in a flat region of the image), the hub's pair takes them all in, as the next rounds would;
    one mutual pair per hub and nothing more threw away 1.2-2.3x bipartite's scatter on photo keys. Chains of nearest
    groups end in a mutual pair, so the merges form a tree. Without `refine`, such merges are taken only after all the
    others, to reach r.

    The number of rounds depends on r and the token count only, and nothing branches on the data: one graph for
    `torch.compile(fullgraph=True)`, `torch.export` and ONNX, no host sync on a GPU, and NaN or inf keys (zeroed)
    cannot keep it from ending.
    """
    num_tokens = metric.shape[1]
    _check_merge_r(r, num_tokens, "ward", protect_cls)
    if r == 0:
        return _identity, _identity
    max_rounds = max(max_rounds, 1)
    with torch.no_grad():
        unit, weight = _unit_vectors_and_weights(metric, size)
        if max_rounds == 1 and refine and _fallback_rounds(num_tokens - int(protect_cls), r) == 1:
            destination = _ward_one_round(unit, weight, r, protect_cls)
        else:
            destination = _ward_rounds(unit, weight, r, protect_cls, max_rounds, refine)
    return _merge_by_destination(destination, num_tokens - r)


def _ward_rounds(unit, weight, r: int, protect_cls: bool, max_rounds: int, refine: bool) -> torch.LongTensor:
    """`ward_matching`'s rounds in general (any r, any number of rounds): the destination [batch, tokens] of each
    token."""
    batch, num_tokens, channels = unit.shape
    device = unit.device
    filling_rounds = max(1, _fallback_rounds(num_tokens - int(protect_cls), r))
    num_rounds = max_rounds - 1 + filling_rounds
    refine = refine and filling_rounds == 1  # refining reads the groups of mutual merges, before any filler moved
    positions = torch.arange(num_tokens, device=device)
    # Groups never move: group i is the one whose first token is i. `parent`: the group i merged into.
    parent = positions.expand(batch, -1).clone()
    merge_cost = torch.full_like(weight, math.inf)  # the Ward cost of that merge
    filler = torch.zeros_like(weight, dtype=torch.bool)  # merges made only to reach r
    centroid, group_weight = unit, weight
    live = torch.ones_like(filler)
    if protect_cls:
        live[:, 0] = False  # the class token neither joins nor takes in a group
    exact = torch.zeros_like(filler[:, :1])
    # A group never joins itself: an additive inf diagonal (not an in-place diagonal view, which ONNX cannot take).
    itself = torch.eye(num_tokens, dtype=torch.bool, device=device)
    itself = torch.zeros(num_tokens, num_tokens, device=device).masked_fill_(itself, math.inf)
    for round_index in range(num_rounds):
        last_round = round_index == num_rounds - 1
        cost = _ward_costs(centroid, group_weight, centroid, group_weight, live, exclude=itself)
        best_cost, nearest = cost.min(dim=-1)
        can_join = live & best_cost.isfinite() & ~exact
        mutual = can_join & (nearest.gather(1, nearest) == positions)
        nearest_weight = group_weight.gather(1, nearest)
        lighter = (group_weight < nearest_weight) | ((group_weight == nearest_weight) & (positions > nearest))
        joins = mutual & lighter  # one group of each mutual pair joins the other
        if round_index >= max_rounds - 1:  # filling: every other group may join its nearest
            fills = can_join & ~mutual
            filler |= fills | (joins if round_index >= max_rounds else False)  # then no merge is Ward's
            joins = joins | (fills if not last_round else False)  # the last round's fills move no centroid
            merge_cost = torch.where(fills, best_cost, merge_cost)
            parent = torch.where(fills, nearest, parent)
        merge_cost = torch.where(joins, best_cost, merge_cost)
        parent = torch.where(joins, nearest, parent)
        if last_round and not refine:
            break
        if not last_round:
            # No later merge can cost less than the cheapest cost left after this round.
            second_cost = cost.scatter_(2, nearest[..., None], math.inf).amin(dim=-1)
            lower_bound = torch.where(mutual, second_cost, best_cost).masked_fill(~live, math.inf).amin(-1, True)
            exact |= ((merge_cost <= lower_bound) & ~filler).sum(-1, keepdim=True) >= r

        # Each joining group's weight and weighted centroid go to the group it ends in.
        target = torch.where(joins, nearest, positions)
        if round_index >= max_rounds - 1 and not last_round:  # fills may chain (the last round's do not move)
            for _ in range(num_tokens.bit_length()):
                target = target.gather(1, target)
        moved_weight = group_weight * joins
        taken_weight = torch.zeros_like(group_weight).scatter_add_(1, target, moved_weight)
        moved = (moved_weight[..., None] * centroid).reshape(-1, channels)
        taken_sum = torch.zeros_like(moved).index_add_(0, _flat_rows(target, num_tokens), moved)
        new_weight = group_weight + taken_weight
        merged_centroid = (group_weight[..., None] * centroid + taken_sum.view_as(centroid)) / new_weight[..., None]
        centroid = torch.where(joins[..., None], centroid, merged_centroid)
        group_weight = torch.where(joins, group_weight, new_weight)
        live &= ~joins

    if refine:
        merge_cost, parent, filler = _refine_ward(merge_cost, parent, filler, exact, centroid, group_weight, live)
    # The r cheapest recorded merges, those made only to reach r last (no Ward cost is above 4 * total weight).
    priority = merge_cost + filler * (4 * weight.sum(-1, keepdim=True))
    merged = torch.zeros_like(filler).scatter_(1, priority.topk(r, dim=-1, largest=False).indices, True)
    return _destination_of_merges(merged, parent)


def _ward_one_round(unit, weight, r: int, protect_cls: bool) -> torch.LongTensor:
    """`ward_matching`'s default: one round and `refine`, in as few passes over the N x N matrix as it takes (the
    groups of `_ward_rounds(..., max_rounds=1, refine=True)`; on a CPU that matrix's passes, not the arithmetic, cost).

    Every metric vector has unit length, so `||u_a - u_b||^2 = 2 - 2 cos` and one product gives every pair's Ward cost
    `(1 - cos) * f` with `f = 2 / (1/w_a + 1/w_b)`. A group of at most two tokens (a mutual pair) is then priced from
    those pair costs alone, so a token that merged nowhere is priced against the group of its nearest without a
    centroid. Returns the destination [batch, tokens] of each token."""
    batch, num_tokens, _ = unit.shape
    num_extra = int(protect_cls)  # the class token stays out of the matching
    unit, weight = unit[:, num_extra:], weight[:, num_extra:]
    num_groups = num_tokens - num_extra
    positions = torch.arange(num_groups, device=unit.device)
    # cos - 1, and -inf on the diagonal: a [N, N] addend (an in-place diagonal view is what ONNX cannot take).
    offset = torch.eye(num_groups, dtype=torch.bool, device=unit.device)
    offset = torch.full((num_groups, num_groups), -1.0, device=unit.device).masked_fill_(offset, -math.inf)
    minus_cost = torch.baddbmm(offset, unit, unit.transpose(-1, -2))  # [batch, N, N]: cos - 1
    half_inverse = 0.5 / weight  # 1 / f = half_inverse_a + half_inverse_b
    minus_cost = minus_cost.div_(half_inverse[:, :, None] + half_inverse[:, None, :])  # -(Ward cost of the pair)
    best, nearest = minus_cost.max(dim=-1)  # each token's nearest and -(their pair's cost)
    partner = nearest.gather(1, nearest)
    mutual = partner == positions
    nearest_weight = weight.gather(1, nearest)
    lighter = (weight < nearest_weight) | ((weight == nearest_weight) & (positions > nearest))
    joins = mutual & lighter  # one token of each mutual pair joins the other, at the pair's cost

    # Any other token j joins the group of its nearest a: a, with a's mutual partner b if a has one (else w_b = 0).
    # Ward's cost of adding j to the group {a, b} of weight W = w_a + w_b, written with the pair costs c (from
    # ||u_j - centroid||^2 = (w_a ||u_j - u_a||^2 + w_b ||u_j - u_b||^2) / W - c_ab / W and
    # w_x ||u_j - u_x||^2 = c_jx (1 + w_x / w_j)):  (c_ja (w_j + w_a) + c_jb (w_j + w_b) - c_ab w_j) / (w_j + W).
    with_partner = mutual.gather(1, nearest)
    weight_b = torch.where(with_partner, weight.gather(1, partner), 0.0)
    minus_cost_jb = minus_cost.gather(2, partner[..., None])[..., 0]
    minus_partner_term = minus_cost_jb * (weight + weight_b) - best.gather(1, nearest) * weight
    minus_partner_term = torch.where(with_partner, minus_partner_term, 0.0)  # -(c_jb (w_j + w_b) - c_ab w_j)
    refined = -(best * (weight + nearest_weight) + minus_partner_term)  # the numerator, best being -c_ja
    refined = refined.clamp_min(0) / (weight + nearest_weight + weight_b)

    # The r cheapest merges: the pairs' at their cost, every other token's into its nearest's group at the refined cost.
    priority = torch.where(joins, -best, refined.masked_fill(mutual, math.inf))
    merged = torch.zeros_like(joins).scatter_(1, priority.topk(r, dim=-1, largest=False).indices, True)
    head = torch.where(joins.gather(1, nearest), partner, nearest)  # where a group's pair ended (a joiner's: nearest)
    destination = _destination_of_merges(merged, head)
    if protect_cls:
        destination = torch.cat([destination.new_zeros(batch, 1), destination + 1], dim=1)
    return destination


def _ward_costs(centroid_a, weight_a, centroid_b, weight_b, live_b, exclude=None):
    """Ward cost of joining group a with group b, `||c_a - c_b||^2 / (1/w_a + 1/w_b)` [batch, a, b]; inf where b is
    not live, and where the additive `exclude` [a, b] (0 or inf) says so."""
    squared_norm_b = (centroid_b * centroid_b).sum(-1).masked_fill(~live_b, math.inf)
    squared_norm_a = (centroid_a * centroid_a).sum(-1)
    # In place on the one product: on a CPU each temporary of this size costs as much as the arithmetic.
    cost = torch.bmm(centroid_a, centroid_b.transpose(-1, -2)).mul_(-2)
    cost = cost.add_(squared_norm_a[:, :, None]).add_(squared_norm_b[:, None, :])
    if exclude is not None:
        cost = cost.add_(exclude)
    return cost.div_((1.0 / weight_a)[:, :, None] + (1.0 / weight_b)[:, None, :])


def _refine_ward(merge_cost, parent, filler, exact, centroid, group_weight, live):
    """Each group still live after the round, recorded as a fill into its nearest (`parent`), joins instead the group
    that nearest ended in (itself if it did not move), at the Ward cost against that group's centroid now; these merges
    then rank with the others by cost. Images already exact are left alone."""
    _, num_tokens, channels = centroid.shape
    nearest = parent
    target = torch.where(live.gather(1, nearest), nearest, parent.gather(1, nearest))  # a round's joins reach a head
    retarget = filler & live & ~exact
    target_centroid = centroid.reshape(-1, channels).index_select(0, _flat_rows(target, num_tokens)).view_as(centroid)
    distance = (centroid - target_centroid).pow(2).sum(-1)
    cost = distance / (1.0 / group_weight + 1.0 / group_weight.gather(1, target))
    merge_cost = torch.where(retarget, cost, merge_cost)
    return merge_cost, torch.where(retarget, target, parent), filler & ~retarget


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
    "bipartite": lambda metric, r, size, protect_cls=True: bipartite_soft_matching(metric, r, protect_cls),
    "submodular": lambda metric, r, size, protect_cls=True: submodular_matching(metric, r, size, protect_cls),
    "ward": lambda metric, r, size, protect_cls=True: ward_matching(metric, r, size, protect_cls),
}


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
        return self.projection(features).flatten(2).transpose(1, 2)  # [batch, patches, hidden]


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


def _without_extra(x: torch.Tensor, num_extra: int) -> torch.Tensor:
    """`x` [batch, tokens, ...] without the `num_extra` tokens after the first (distillation, registers)."""
    return torch.cat([x[:, :1], x[:, 1 + num_extra :]], dim=1) if num_extra else x


def _protect_prefix(merge: Callable, unmerge: Callable, num_extra: int):
    """Wrap a matching's closures so that the `num_extra` tokens after the first (distillation, registers) pass
    through untouched and stay in place: the matching itself sees the first token (protected there) and the patches."""
    if num_extra == 0:
        return merge, unmerge

    def with_extra(rest, x):  # `rest` with `x`'s extra tokens put back after its first
        return torch.cat([rest[:, :1], x[:, 1 : 1 + num_extra], rest[:, 1:]], dim=1)

    def protected_merge(x, mode="mean"):
        return with_extra(merge(_without_extra(x, num_extra), mode=mode), x)

    def protected_unmerge(x):
        return with_extra(unmerge(_without_extra(x, num_extra)), x)

    return protected_merge, protected_unmerge


class ConformerLayer(GradientCheckpointingLayer):
    """Pre-norm transformer block with token merging between attention and MLP.

    Token sizes and the source map travel with the hidden states; the layer keeps no state between calls.
    """

    def __init__(self, config: ConformerConfig):
        super().__init__()
        self.attention = ConformerAttention(config)
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = ConformerSwiGLU(config) if config.mlp_type == "swiglu" else ConformerMLP(config)
        scale = config.layer_scale_init_value
        # DINOv2's layer scale: a learned per-channel factor on each residual branch.
        self.attention_scale = nn.Parameter(torch.full((config.hidden_size,), scale)) if scale is not None else None
        self.mlp_scale = nn.Parameter(torch.full((config.hidden_size,), scale)) if scale is not None else None
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
        attn_output, _, key = self.attention(self.layernorm_before(hidden_states), attention_bias, **kwargs)
        if self.attention_scale is not None:
            attn_output = attn_output * self.attention_scale
        hidden_states = residual + self.dropout(attn_output)

        if merge_r > 0:
            # Prefix tokens never merge: the class token is protected inside the matching, the others pass around it.
            config = self.config
            metric = key.mean(dim=1)  # the keys averaged over heads, as ToMe: [batch, tokens, head_dim]
            num_extra = max(config.num_prefix_tokens - 1, 0)
            sizes_seen = _without_extra(token_sizes, num_extra) if token_sizes is not None else None
            merge, unmerge = MATCHING_FUNCTIONS[config.merge_mode](
                _without_extra(metric, num_extra), merge_r, sizes_seen, config.class_token
            )
            merge, unmerge = _protect_prefix(merge, unmerge, num_extra)
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
        id; see `SOURCE_CLASSES`): ViT, ViT-MSN, DeiT (also with its teacher head), DINOv2 (also with registers),
        the CLIP and SigLIP vision towers, I-JEPA. `from_transformers("facebook/dinov2-small", merge_mode="ward",
        merge_r=8)`. With merging off it returns what the source returns (`last_hidden_state`, `pooler_output`,
        `logits`). `image_size` resamples the position embeddings (bilinear, as timm's loader); another
        `num_labels` or `classifier` gets a new head with a zero classifier."""
        source = _load_source(model_or_path, attn_implementation)
        base_state, head_state, source_classifier = _source_state_dict(source)
        fields = _source_architecture(source)
        source_config = source.config
        has_head = source_classifier is not None and "classifier.weight" in head_state
        fields["classifier"] = source_classifier or ("token" if fields.get("class_token", True) else "gap")
        num_labels = config_overrides.get("num_labels", source_config.num_labels if has_head else 0)
        if has_head and num_labels == source_config.num_labels and "id2label" not in config_overrides:
            fields.update(id2label=dict(source_config.id2label), label2id=dict(source_config.label2id))
        config = ConformerConfig(**{**fields, **config_overrides, "num_labels": num_labels})
        model = cls._from_config(config, attn_implementation=attn_implementation)
        if cls.base_model_prefix in dict(model.named_children()):
            state_dict = {f"{cls.base_model_prefix}.{key}": value for key, value in base_state.items()}
            state_dict.update(head_state)
        else:
            state_dict = base_state
        model.load_state_dict(adapt_state_dict(state_dict, model), strict=True)
        return model.to(next(source.parameters()).dtype)


def check_merge_schedule(config: ConformerConfig, num_patches: int | None = None):
    """Raise `ValueError` if some layer's r exceeds what its merge mode can remove from the tokens left there."""
    num_tokens = config.num_prefix_tokens + (config.num_patches if num_patches is None else num_patches)
    requested = config.merge_r_per_layer
    fitted = merge_schedule(
        requested, num_tokens, config.num_hidden_layers, (config.merge_mode,), config.num_prefix_tokens
    )
    for layer, (r, limit) in enumerate(zip(requested, fitted)):
        if r > limit:
            raise ValueError(
                f"`merge_r` asks layer {layer} to remove {r} tokens, but {config.merge_mode} matching can remove at "
                f"most {limit} of the {num_tokens - sum(fitted[:layer])} tokens left there at "
                f"image_size={config.image_size}; lower `merge_r`."
            )


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
        check_merge_schedule(config)
        self.embeddings = ConformerEmbeddings(config)
        self.pre_layernorm = None
        if config.pre_layernorm:  # CLIP's norm before the first layer
            self.pre_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList([ConformerLayer(config) for _ in range(config.num_hidden_layers)])
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
        for layer, merge_r in zip(self.layers, self.config.merge_r_per_layer):
            hidden_states, merged_sizes, source_map = layer(
                hidden_states, merged_sizes, source_map, merge_r=merge_r, **kwargs
            )

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
            model_type = getattr(getattr(model_or_path, "config", None), "model_type", None)
            if model_type != "vit":
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


# --------------------------------------------------------------------------------------------------------------------
# Sources: transformers' ViT family. Each source's base model maps onto `ConformerModel` by renaming its keys; its head
# (if any) onto ours. With merging off, the Conformer computes what the source computes.
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


def _load_source(model_or_path, attn_implementation: str | None):
    """The source model: a model object, or a local folder / Hub id loaded with the class its config names."""
    import transformers

    supported = f"supported: {', '.join(SOURCE_CLASSES)}"
    if isinstance(model_or_path, nn.Module):
        source = model_or_path
    else:
        config = transformers.AutoConfig.from_pretrained(model_or_path)
        architecture = (getattr(config, "architectures", None) or [None])[0]
        if architecture not in SOURCE_CLASSES:
            raise ValueError(
                f"{model_or_path!r} holds a {config.model_type!r} model ({architecture}), not one of the ViT family "
                f"Conformer takes; {supported}."
            )
        source = getattr(transformers, architecture).from_pretrained(
            model_or_path, attn_implementation=attn_implementation
        )
    if type(source).__name__ not in SOURCE_CLASSES:
        raise TypeError(f"from_transformers cannot take a {type(source).__name__}; {supported}.")
    if type(source).__name__ in ("CLIPModel", "SiglipModel"):
        source = source.vision_model  # the vision tower, before the projection into the joint space
    return source


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
