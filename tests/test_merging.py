"""Token merging: bipartite matching against a reference written from the paper, invariants of every mode, and the
model-level behaviour (proportional attention, r schedules, errors)."""

import math

import pytest
import torch
import torch.nn.functional as F

from configuration_conformer import ConformerConfig
from modeling_conformer import ConformerAttention, ConformerForImageClassification
from token_merging import (
    MATCHING_FUNCTIONS,
    bipartite_soft_matching,
    max_merge_r,
    merge_source,
    merge_wavg,
    submodular_matching,
    ward_matching,
)

MATCHINGS = {
    "bipartite": lambda metric, r, size=None: bipartite_soft_matching(metric, r),
    "submodular": lambda metric, r, size=None: submodular_matching(metric, r, size),
    "ward": lambda metric, r, size=None: ward_matching(metric, r, size),
}
TINY = dict(
    hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8
)


def paper_bipartite_groups(metric, r):
    """ToMe, section 3, one image at a time: A = even positions, B = odd; each A token's best B edge by cosine
    similarity; the r A tokens with the highest edges join their B token; the class token (position 0) never merges.
    Returns the output groups in ToMe's order: kept A tokens by position, then every B token (with what joined it)."""
    tokens = range(metric.shape[0])
    set_a, set_b = [i for i in tokens if i % 2 == 0], [i for i in tokens if i % 2 == 1]
    unit = F.normalize(metric, dim=-1)
    best = {}
    for a in set_a[1:]:
        similarities = [float(unit[a] @ unit[b]) for b in set_b]
        best[a] = (max(similarities), set_b[similarities.index(max(similarities))])
    merged = sorted(best, key=lambda a: -best[a][0])[:r]
    groups = [[a] for a in set_a if a not in merged]
    groups += [sorted([b] + [a for a in merged if best[a][1] == b]) for b in set_b]
    return groups


def groups_of(unmerge, batch, num_tokens, num_out):
    """The original tokens in each output token, per image."""
    destination = merge_source(unmerge, torch.arange(num_tokens).expand(batch, -1), num_out)
    return [[torch.nonzero(row == k).flatten().tolist() for k in range(num_out)] for row in destination]


@pytest.mark.parametrize("num_tokens, r", [(17, 1), (17, 5), (17, 8), (26, 6)])
def test_bipartite_matches_the_papers_algorithm(num_tokens, r):
    torch.manual_seed(num_tokens + r)
    metric, features = torch.randn(3, num_tokens, 8), torch.randn(3, num_tokens, 5)
    sizes = torch.randint(1, 5, (3, num_tokens, 1)).float()
    merge, unmerge = bipartite_soft_matching(metric, r)
    merged, merged_sizes = merge_wavg(merge, features, sizes)
    assert groups_of(unmerge, 3, num_tokens, num_tokens - r) == [paper_bipartite_groups(m, r) for m in metric]
    for image in range(3):
        for k, group in enumerate(paper_bipartite_groups(metric[image], r)):
            weights = sizes[image, group]
            expected = (features[image, group] * weights).sum(0) / weights.sum()
            assert torch.allclose(merged[image, k], expected, atol=1e-6)
            assert merged_sizes[image, k, 0] == weights.sum()


@pytest.mark.parametrize("mode", sorted(MATCHINGS))
@pytest.mark.parametrize("num_tokens, r", [(17, 0), (17, 3), (16, 7), (197, 13), (17, 15), (40, 30)])
def test_merge_invariants(mode, num_tokens, r):
    if r > max_merge_r(num_tokens, mode):
        pytest.skip(f"{mode} cannot remove {r} of {num_tokens} tokens")
    torch.manual_seed(r)
    metric, features = torch.randn(4, num_tokens, 16), torch.randn(4, num_tokens, 6)
    merge, unmerge = MATCHINGS[mode](metric, r)
    merged, sizes = merge_wavg(merge, features)
    assert merged.shape == (4, num_tokens - r, 6) and sizes.shape == (4, num_tokens - r, 1)
    assert torch.equal(sizes.sum(1), torch.full((4, 1), float(num_tokens)))
    assert torch.equal(merged[:, 0], features[:, 0]) and (sizes[:, 0] == 1).all()  # class token untouched
    groups = groups_of(unmerge, 4, num_tokens, num_tokens - r)
    for image_groups in groups:  # a partition: every token in exactly one non-empty group
        assert sorted(t for g in image_groups for t in g) == list(range(num_tokens))
        assert all(image_groups) and image_groups[0] == [0]
    # unmerge(merge(x)): each original token receives its group's mean
    restored = unmerge(merge(features, mode="mean"))
    for image, image_groups in enumerate(groups):
        for group in image_groups:
            assert torch.allclose(restored[image, group], features[image, group].mean(0).expand(len(group), -1))
    assert torch.allclose(merge(features, mode="sum").sum(1), features.sum(1), atol=1e-5)


@pytest.mark.parametrize("mode", sorted(MATCHINGS))
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_every_mode_ends_with_a_partition_on_non_finite_keys(mode, bad):
    """A diverged run feeds NaN or inf keys: every matching still ends (bounded rounds) and partitions the tokens."""
    torch.manual_seed(0)
    metric = torch.randn(3, 41, 8)
    metric[0] = bad  # every key of one image
    metric[1, ::3, 2] = bad  # some keys of another
    merge, unmerge = MATCHINGS[mode](metric, 17, torch.ones(3, 41, 1))
    _, sizes = merge_wavg(merge, torch.randn(3, 41, 4))
    assert torch.equal(sizes.sum(1), torch.full((3, 1), 41.0))
    for image_groups in groups_of(unmerge, 3, 41, 24):
        assert sorted(t for g in image_groups for t in g) == list(range(41))
        assert all(image_groups) and image_groups[0] == [0]


@pytest.mark.parametrize("mode", sorted(MATCHINGS))
def test_a_model_with_merging_on_returns_on_nan_pixels(mode):
    model = ConformerForImageClassification(ConformerConfig(**TINY, merge_mode=mode, merge_r=[5, 4, 3])).eval()
    with torch.no_grad():
        outputs = model(torch.full((2, 3, 32, 32), math.nan), output_merge_info=True)
    assert outputs.token_sizes.shape == (2, 5) and torch.equal(outputs.token_sizes.sum(1), torch.full((2,), 17.0))


def test_submodular_recovers_duplicated_tokens_exactly():
    """Five directions, each repeated four times (plus a class token): removing 15 tokens must merge the duplicates
    and lose nothing, since keeping one copy of each direction represents every token perfectly."""
    torch.manual_seed(0)
    directions = F.normalize(torch.randn(5, 16), dim=-1)
    tokens = directions.repeat_interleave(4, dim=0)[torch.randperm(20)]
    metric = torch.cat([torch.randn(1, 16), tokens])[None]
    merge, unmerge = submodular_matching(metric, 15)
    restored = unmerge(merge(metric, mode="mean"))
    assert torch.allclose(restored, metric, atol=1e-6)


def test_ward_equals_scikit_learns_ward_clustering():
    """With enough rounds the batched Ward cut is exactly Ward's: the same groups as scikit-learn's
    AgglomerativeClustering(linkage="ward") of the unit metric vectors (class token apart)."""
    from sklearn.cluster import AgglomerativeClustering

    torch.manual_seed(3)
    metric = torch.randn(3, 8, 12)[:, torch.randint(0, 8, (41,))] + 0.4 * torch.randn(3, 41, 12)
    r = 17
    _, unmerge = ward_matching(metric, r, max_rounds=100)
    for image, image_groups in enumerate(groups_of(unmerge, 3, 41, 41 - r)):
        unit = F.normalize(metric[image, 1:], dim=-1).double().numpy()
        labels = AgglomerativeClustering(n_clusters=40 - r, linkage="ward").fit_predict(unit)
        expected = sorted(sorted(1 + i for i in range(40) if labels[i] == label) for label in set(labels))
        assert sorted(image_groups[1:]) == expected


def clustered_tokens(batch=8, num_tokens=197, channels=64, clusters=30, noise=0.5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(batch, clusters, channels, generator=generator)
    members = torch.randint(0, clusters, (batch, num_tokens), generator=generator)
    return centres.gather(1, members[..., None].expand(-1, -1, channels)) + noise * torch.randn(
        batch, num_tokens, channels, generator=generator
    )


def scatter(metric, matching, r, size=None):
    """Information a merge throws away: size-weighted scatter of the unit metric vectors around their group means."""
    unit = F.normalize(metric, dim=-1)
    size = torch.ones_like(unit[..., :1]) if size is None else size
    merge, unmerge = matching(metric, r, size)
    means, _ = merge_wavg(merge, unit, size)
    return (size * (unit - unmerge(means)).pow(2)).sum(dim=(1, 2)).mean()


@pytest.mark.parametrize("r", [13, 48])
def test_submodular_and_ward_throw_away_less_than_bipartite(r):
    metric = clustered_tokens()
    bipartite, submodular, ward = (scatter(metric, MATCHINGS[mode], r) for mode in ("bipartite", "submodular", "ward"))
    assert submodular <= 0.97 * bipartite
    assert ward <= submodular


def test_ward_in_one_round_is_within_a_percent_of_exact_ward():
    """The model's ward (one N x N round, then the groups that merged nowhere join the group their nearest ended in)
    against Ward's exact cut (rounds until provably exact): 0.932 and 0.928 of bipartite's scatter at r=13 when
    measured."""
    metric = clustered_tokens()
    bipartite = scatter(metric, MATCHINGS["bipartite"], 13)
    one_round = scatter(metric, MATCHINGS["ward"], 13)
    exact = scatter(metric, lambda metric, r, size: ward_matching(metric, r, size, max_rounds=20), 13)
    without_refining = scatter(metric, lambda metric, r, size: ward_matching(metric, r, size, refine=False), 13)
    assert one_round <= 0.935 * bipartite
    assert exact <= one_round <= 1.01 * exact
    assert one_round < without_refining


@pytest.mark.parametrize("r", [13, 16])
def test_ward_in_one_round_takes_in_a_flat_region_as_exact_ward_does(r):
    """40 of 197 tokens nearly alike (a flat patch of sky): most tokens of the region share one nearest, so one round
    finds only a few mutual pairs there. Measured: 1.02 of bipartite's scatter and 1.14 of exact Ward's; taking only
    the mutual pairs (plus one merge for each) threw away 74-116 times bipartite's."""
    generator = torch.Generator().manual_seed(0)
    metric = torch.randn(4, 197, 64, generator=generator)
    region = torch.randperm(196, generator=generator)[:40] + 1
    metric[:, region] = torch.randn(4, 1, 64, generator=generator) + 0.05 * torch.randn(4, 40, 64, generator=generator)
    bipartite = scatter(metric, MATCHINGS["bipartite"], r)
    one_round = scatter(metric, MATCHINGS["ward"], r)
    exact = scatter(metric, lambda metric, r, size: ward_matching(metric, r, size, max_rounds=20), r)
    assert one_round <= 1.05 * bipartite
    assert exact <= one_round <= 1.25 * exact


@pytest.mark.parametrize("mode", sorted(MATCHINGS))
def test_r_beyond_what_a_call_can_remove_names_the_token_count(mode):
    metric = torch.randn(1, 17, 4)
    limit = {"bipartite": 8, "submodular": 15, "ward": 15}[mode]
    MATCHINGS[mode](metric, limit)  # the limit itself works
    with pytest.raises(ValueError, match="17 tokens"):
        MATCHINGS[mode](metric, limit + 1)
    with pytest.raises(ValueError, match="r=-1"):
        MATCHINGS[mode](metric, -1)


def test_merge_wavg_is_safe_in_float16():
    features = torch.full((1, 9, 4), 3000.0, dtype=torch.float16)
    sizes = torch.full((1, 9, 1), 100.0)
    merge, _ = bipartite_soft_matching(torch.randn(1, 9, 4), 4)
    merged, merged_sizes = merge_wavg(merge, features, sizes)
    assert merged.dtype == torch.float16 and torch.isfinite(merged).all()
    assert torch.allclose(merged.float(), torch.full_like(merged.float(), 3000.0))


def test_proportional_attention_equals_eager_attention_with_a_log_size_bias():
    torch.manual_seed(0)
    config = ConformerConfig(**TINY)
    config._attn_implementation = "eager"
    attention = ConformerAttention(config).eval()
    hidden = torch.randn(2, 7, 32)
    sizes = torch.randint(1, 6, (2, 7)).float()
    bias = sizes.log()[:, None, None, :]
    output, weights, _ = attention(hidden, bias)

    # By hand: softmax(q k^T / sqrt(d) + log(size_key)) v, heads concatenated, then the output projection.
    def heads(x):
        return x.view(2, 7, 4, 8).transpose(1, 2)

    query, key, value = (
        heads(attention.q_proj(hidden)),
        heads(attention.k_proj(hidden)),
        heads(attention.v_proj(hidden)),
    )
    logits = query @ key.transpose(-1, -2) / math.sqrt(8) + sizes.log()[:, None, None, :]
    expected_weights = logits.softmax(-1)
    expected = attention.o_proj((expected_weights @ value).transpose(1, 2).reshape(2, 7, 32))
    assert torch.allclose(weights, expected_weights, atol=1e-6)
    assert torch.allclose(output, expected, atol=1e-6)


@pytest.mark.parametrize("mode", sorted(MATCHINGS))
def test_sdpa_and_eager_agree_with_merging_on(mode):
    torch.manual_seed(0)
    config = ConformerConfig(**TINY, merge_mode=mode, merge_r=[3, 2, 2], num_labels=4)
    eager = ConformerForImageClassification._from_config(config, attn_implementation="eager").eval()
    sdpa = ConformerForImageClassification._from_config(config, attn_implementation="sdpa").eval()
    sdpa.load_state_dict(eager.state_dict())
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(eager(pixels).logits, sdpa(pixels).logits, atol=1e-5)


@pytest.mark.parametrize("mode", sorted(MATCHINGS))
def test_r_zero_equals_merging_off(mode):
    torch.manual_seed(0)
    off = ConformerForImageClassification(ConformerConfig(**TINY, num_labels=4)).eval()
    zero = ConformerForImageClassification(ConformerConfig(**TINY, num_labels=4, merge_mode=mode, merge_r=0)).eval()
    zero.load_state_dict(off.state_dict())
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(off(pixels).logits, zero(pixels).logits)


@pytest.mark.parametrize("mode", sorted(MATCHINGS))
def test_per_layer_schedule_and_merge_info(mode):
    model = ConformerForImageClassification(ConformerConfig(**TINY, merge_mode=mode, merge_r=[5, 0, 3])).eval()
    outputs = model(torch.randn(2, 3, 32, 32), output_hidden_states=True, output_merge_info=True)
    assert [h.shape[1] for h in outputs.hidden_states] == [17, 12, 12, 9]
    assert outputs.token_sizes.shape == (2, 9) and torch.equal(outputs.token_sizes.sum(1), torch.full((2,), 17.0))
    assert outputs.source_map.shape == (2, 17) and (outputs.source_map[:, 0] == 0).all()
    for sizes, source in zip(outputs.token_sizes, outputs.source_map):  # the map and the sizes agree
        assert torch.equal(torch.bincount(source, minlength=9).float(), sizes)


def test_merge_info_is_left_out_unless_asked():
    model = ConformerForImageClassification(ConformerConfig(**TINY, merge_mode="bipartite", merge_r=2)).eval()
    outputs = model(torch.randn(1, 3, 32, 32))
    assert outputs.token_sizes is None and outputs.source_map is None


def test_cnn_head_reads_tokens_laid_back_on_the_patch_grid():
    """With merging off, the CNN head's input is exactly the patch tokens in raster order."""
    model = ConformerForImageClassification(ConformerConfig(**TINY, classifier="cnn", cnn_head_channels=8)).eval()
    seen = {}
    model.cnn_head.layers[0].register_forward_hook(lambda module, args, out: seen.update(grid=args[0]))
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.conformer(pixels).last_hidden_state
        model(pixels)
    assert torch.equal(seen["grid"], tokens[:, 1:].transpose(1, 2).reshape(2, 32, 4, 4))


def test_gap_classifier_is_a_size_weighted_mean():
    model = ConformerForImageClassification(
        ConformerConfig(**TINY, classifier="gap", merge_mode="submodular", merge_r=4)
    ).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        base = model.conformer(pixels)
        sizes = base.token_sizes[:, 1:, None]
        expected = model.classifier((base.last_hidden_state[:, 1:] * sizes).sum(1) / sizes.sum(1))
        assert torch.allclose(model(pixels).logits, expected, atol=1e-6)


def test_merging_is_read_once_when_the_model_is_built_and_reconfigured_gives_the_same_weights_merging():
    """A built model keeps the merging it was built with (transformers reads a config once); `reconfigured` builds the
    same weights with another merge setting, equal to a model built with that config and given those weights."""
    from conformer_vit.sources import reconfigured

    model = ConformerForImageClassification(ConformerConfig(**TINY)).eval()
    pixels = torch.randn(1, 3, 32, 32)
    model.config.merge_mode, model.config.merge_r = "submodular", 4  # too late: the layers are built
    assert model(pixels, output_merge_info=True).token_sizes.shape == (1, 17)
    model.config.merge_mode, model.config.merge_r = "none", 0

    merged = reconfigured(model, merge_mode="submodular", merge_r=4)
    reference = ConformerForImageClassification(ConformerConfig(**TINY, merge_mode="submodular", merge_r=4)).eval()
    reference.load_state_dict(model.state_dict())
    output = merged(pixels, output_merge_info=True)
    assert output.token_sizes.shape == (1, 5) and not merged.training
    assert torch.equal(output.logits, reference(pixels).logits)
    assert model.config.merge_mode == "none"  # the original is left as it was


@pytest.mark.parametrize("r", [1, 13, 48, 98])
def test_ward_one_round_fast_path_gives_the_general_rounds_groups(r):
    """The default path (one product, cosines gathered) against the general rounds at max_rounds=1 with refine."""
    from token_merging import _unit_vectors_and_weights, _ward_one_round, _ward_rounds

    metric = clustered_tokens(seed=r)
    size = torch.randint(1, 5, (8, 197, 1)).float()
    for weights in (None, size):
        unit, weight = _unit_vectors_and_weights(metric, weights)
        assert torch.equal(_ward_one_round(unit, weight, r, True), _ward_rounds(unit, weight, r, True, 1, True))


@pytest.mark.parametrize("mode", ["bipartite", "submodular", "ward"])
@pytest.mark.parametrize("protect_cls", [True, False])
def test_max_merge_r_is_exactly_what_the_matching_accepts_on_every_small_token_count(mode, protect_cls):
    """Zero and one token included: every r up to `max_merge_r` merges to N - r tokens, one more is a ValueError."""
    for num_tokens in range(7):
        limit = max_merge_r(num_tokens, mode, protect_cls)
        metric = torch.randn(2, num_tokens, 4, generator=torch.manual_seed(num_tokens))
        for r in range(limit + 1):
            merge, _ = MATCHING_FUNCTIONS[mode](metric, r, None, protect_cls)
            assert merge(torch.randn(2, num_tokens, 3)).shape == (2, num_tokens - r, 3)
        with pytest.raises(ValueError, match="cannot remove"):
            MATCHING_FUNCTIONS[mode](metric, limit + 1, None, protect_cls)


def test_merge_wavg_keeps_float64_and_runs_float16_in_float32():
    merge, _ = bipartite_soft_matching(torch.randn(1, 9, 4), 4)
    x = torch.randn(1, 9, 3, dtype=torch.float64)
    merged, size = merge_wavg(merge, x)
    assert merged.dtype == size.dtype == torch.float64
    groups = merge(torch.eye(9, dtype=torch.float64)[None], mode="sum")[0]  # [groups, tokens]: who joined whom
    torch.testing.assert_close(merged[0], (groups @ x[0]) / groups.sum(1, keepdim=True), rtol=1e-15, atol=1e-15)
    half, half_size = merge_wavg(merge, torch.full((1, 9, 3), 60000.0, dtype=torch.float16))
    assert half.dtype == torch.float16 and half_size.dtype == torch.float32 and half.isfinite().all()
