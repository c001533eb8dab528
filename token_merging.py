"""Token merging as pure functions, like ToMe's `merge.py`: no model, no state, torch only.

A matching function looks at a metric (the attention keys averaged over heads) and returns two closures: `merge` maps
[batch, tokens, channels] to [batch, tokens - r, channels] and `unmerge` maps back, each original token receiving its
group's value. Both are driven by one index, `destination[b, i]`: the output token that input token i joins. Kept tokens
stay in their input order, so the class token stays first.

- `bipartite_soft_matching`: ToMe's bipartite soft matching, the baseline.
- `submodular_matching`: keep the tokens that best represent the others (facility location).
- `ward_matching`: Ward's agglomerative clustering, the least added scatter.
- `merge_wavg`, `merge_source`: apply a matching to features (size-weighted means) and to the source map.
- `match_tokens`: one layer's matching with the prefix tokens (class, distillation, registers) kept out of it.
- `max_merge_r`, `merge_schedule`, `check_merge_schedule`, `parse_merge_r`: how many tokens each layer may remove.
- `decreasing_schedule` (ToMe's), `staged_schedule` (ATC's: a few layers, a keep rate each), `token_layers` and
  `keep_rate_for_token_layers`: schedules, and schedules at equal cost.
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


def _identity(x, mode=None):
    return x


def _flat_rows(index: torch.LongTensor, rows_per_image: int) -> torch.LongTensor:
    """`index` [batch, n] of rows within each image, as one index [batch * n] into the batch's rows flattened to
    [batch * rows_per_image]. `index_add_`/`index_select` on it move whole channel rows, several times faster on a CPU
    than `scatter_add_`/`gather` along dim 1 with an index expanded over the channels."""
    offsets = rows_per_image * torch.arange(index.shape[0], device=index.device)[:, None]
    return (index + offsets).reshape(-1)


def merge_by_destination(destination: torch.LongTensor, num_out: int):
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
    if mode == "bipartite" and num_tokens >= 2:
        # Only tokens of set A (even positions) can go, into set B, and the class token, if protected, is in A.
        return (num_tokens + 1) // 2 - int(protect_cls)
    if mode in ("submodular", "ward"):
        # Keep the class token (if protected) and at least one other token.
        return max(num_tokens - 1 - int(protect_cls), 0)
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


def decreasing_schedule(merge_r: int, num_layers: int, inflection: float = 0.5) -> list[int]:
    """ToMe's decreasing schedule: r per layer falling linearly from `(1 + inflection) * merge_r` in the first layer to
    `(1 - inflection) * merge_r` in the last (rounded down), about `merge_r` per layer on average: merge more where
    tokens are many and cheap to lose."""
    if num_layers == 1:
        return [merge_r]
    first, last = merge_r * (1 + inflection), merge_r * (1 - inflection)
    return [int(first + (last - first) * layer / (num_layers - 1)) for layer in range(num_layers)]


def staged_schedule(
    num_tokens: int, num_layers: int, merge_layers: list[int], keep_rate, num_prefix_tokens: int = 1
) -> list[int]:
    """ATC's staged reduction: merging only in the layers `merge_layers` (0-based), each keeping `keep_rate` (one
    float, or one per site) of the patch tokens left there, rounded: r = round((1 - keep) * patches left). Other
    layers merge nothing. E.g. ViT-S at 224 px (196 patches), layers 3, 6, 9, keep 0.631: r = 72, 46, 29."""
    rates = list(keep_rate) if isinstance(keep_rate, (list, tuple)) else [keep_rate] * len(merge_layers)
    schedule, patches = [0] * num_layers, num_tokens - num_prefix_tokens
    for layer, rate in zip(merge_layers, rates):
        schedule[layer] = round((1 - rate) * patches)
        patches -= schedule[layer]
    return schedule


def token_layers(schedule: list[int], num_tokens: int) -> int:
    """Tokens summed over every attention and every MLP of the encoder when layer i merges `schedule[i]` tokens
    between them: the work (roughly) that a schedule leaves, so that schedules compare at equal cost."""
    total = 0
    for merge_r in schedule:
        total += num_tokens + (num_tokens - merge_r)  # attention sees the tokens before the merge, the MLP after
        num_tokens -= merge_r
    return total


def keep_rate_for_token_layers(
    target: int, num_tokens: int, num_layers: int, merge_layers: list[int], num_prefix_tokens: int = 1
) -> float:
    """The one keep rate at `merge_layers` whose staged schedule leaves the token-layers closest to `target` (e.g. a
    constant schedule's): schedules at equal cost, computed rather than picked by hand. Bisection on the rate."""

    def cost(rate):
        return token_layers(staged_schedule(num_tokens, num_layers, merge_layers, rate, num_prefix_tokens), num_tokens)

    low, high = 0.0, 1.0  # cost grows with the rate: keeping more costs more
    for _ in range(40):  # a fixed number of halvings: ends on any input
        middle = (low + high) / 2
        low, high = (middle, high) if cost(middle) < target else (low, middle)
    return min((low, high), key=lambda rate: abs(cost(rate) - target))


def parse_merge_r(text: str) -> int | list[int]:
    """`merge_r` as written on a command line: one int for every layer, or comma-separated ints, one per layer."""
    try:
        values = [int(value) for value in str(text).split(",")]
    except ValueError:
        raise ValueError(f"merge_r must be an int or comma-separated ints (one per layer), got {text!r}") from None
    return values[0] if len(values) == 1 else values


def parse_staged(layers_text: str, keep_rate_text: str) -> dict:
    """`--merge_layers 3,6,9 --merge_keep_rate 0.63` (or one rate per layer, comma-separated) as config fields."""
    try:
        layers = [int(value) for value in str(layers_text).split(",")]
        rates = [float(value) for value in str(keep_rate_text).split(",")]
    except ValueError:
        raise ValueError(
            f"merge_layers must be comma-separated ints and merge_keep_rate one float or one per layer, got "
            f"{layers_text!r} and {keep_rate_text!r}"
        ) from None
    return {"merge_layers": layers, "merge_keep_rate": rates[0] if len(rates) == 1 else rates}


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
    return merge_by_destination(destination, num_tokens - r)


def _unit_vectors_and_weights(metric: torch.Tensor, size: torch.Tensor | None):
    """Unit-length metric vectors [batch, tokens, channels] and token weights [batch, tokens], both float32."""
    unit = F.normalize(metric.float().nan_to_num(0.0, 0.0, 0.0), dim=-1)  # NaN/inf keys (a diverged run): zero
    if size is None:
        return unit, unit.new_ones(unit.shape[:2])
    return unit, size.float().reshape(unit.shape[:2])


def destination_from_owner(owner: torch.LongTensor, kept: torch.BoolTensor) -> torch.LongTensor:
    """`owner[b, i]`: the kept token that token i joins (itself if kept). Output k is the k-th kept token."""
    output_index = kept.long().cumsum(dim=-1) - 1
    return output_index.gather(1, owner)


def _destination_of_merges(merged: torch.BoolTensor, parent: torch.LongTensor) -> torch.LongTensor:
    """Each merged token goes to its `parent`; chains of merges are followed (pointer jumping) to their kept token."""
    positions = torch.arange(merged.shape[1], device=merged.device)
    owner = torch.where(merged, parent, positions)
    for _ in range(merged.shape[1].bit_length()):
        owner = owner.gather(1, owner)
    return destination_from_owner(owner, ~merged)


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
    more (benchmarks/results/merge_quality.md).
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
            # runtime keeps the same tokens (ONNX has no stable sort). Later tokens go first: earliest-first trains
            # worse (tests/test_training.py).
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
        destination = destination_from_owner(owner, kept)
    return merge_by_destination(destination, num_tokens - r)


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
    share one nearest (a hub in a flat region of the image), the hub's pair takes them all in, as the next rounds would,
    instead of one mutual pair per hub and nothing more. Chains of nearest
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
    return merge_by_destination(destination, num_tokens - r)


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

    The weighted sum runs in at least float32 (float64 stays float64): in fp16 a feature times a size of a hundred
    patches can overflow.
    """
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    size = torch.ones_like(x[..., :1], dtype=compute_dtype) if size is None else size.to(compute_dtype)
    weighted = merge(x.to(compute_dtype) * size, mode="sum")
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


def match_tokens(
    mode: str,
    metric: torch.Tensor,
    r: int,
    size: torch.Tensor | None = None,
    num_prefix_tokens: int = 1,
    class_token: bool = True,
):
    """One layer's `(merge, unmerge)` by `mode`'s matching. Prefix tokens never merge: the first (the class token,
    if `class_token`) is protected inside the matching, the others (distillation, registers) pass around it."""
    num_extra = max(num_prefix_tokens - 1, 0)
    sizes_seen = _without_extra(size, num_extra) if size is not None else None
    merge, unmerge = MATCHING_FUNCTIONS[mode](_without_extra(metric, num_extra), r, sizes_seen, class_token)
    return _protect_prefix(merge, unmerge, num_extra)


def check_merge_schedule(
    merge_r, num_layers: int, num_tokens: int, mode: str, num_prefix_tokens: int = 1, where: str = ""
):
    """Raise `ValueError` if some layer's r (`merge_r`: one int for every layer, or one per layer) exceeds what
    `mode`'s matching can remove from the tokens left there (`num_tokens`: prefix tokens included; `where` ends the
    message, e.g. " at image_size=224")."""
    if mode == "none":
        return
    requested = list(merge_r) if isinstance(merge_r, (list, tuple)) else [merge_r] * num_layers
    fitted = merge_schedule(requested, num_tokens, num_layers, (mode,), num_prefix_tokens)
    for layer, (r, limit) in enumerate(zip(requested, fitted)):
        if r > limit:
            raise ValueError(
                f"`merge_r` asks layer {layer} to remove {r} tokens, but {mode} matching can remove at most {limit} "
                f"of the {num_tokens - sum(fitted[:layer])} tokens left there{where}; lower `merge_r`."
            )


__all__ = [
    "MATCHING_FUNCTIONS",
    "bipartite_soft_matching",
    "check_merge_schedule",
    "decreasing_schedule",
    "keep_rate_for_token_layers",
    "destination_from_owner",
    "match_tokens",
    "max_merge_r",
    "merge_by_destination",
    "merge_schedule",
    "merge_source",
    "merge_wavg",
    "parse_merge_r",
    "parse_staged",
    "staged_schedule",
    "submodular_matching",
    "token_layers",
    "ward_matching",
]
