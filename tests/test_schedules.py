"""Merge schedules as config: ToMe's constant and decreasing r, ATC's staged reduction (a few layers, a keep rate
each), the token-layers of any schedule and staged schedules at equal cost; their flags in the converter and the
training script."""

import json

import pytest
import torch
from huggingface_hub import ModelCard

import convert_npz_to_hf as converter
import run_image_classification as training
from configuration_conformer import ConformerConfig
from modeling_conformer import ConformerForImageClassification
from token_merging import (
    decreasing_schedule,
    keep_rate_for_token_layers,
    parse_staged,
    staged_schedule,
    token_layers,
)


def test_staged_schedule_of_vit_s_is_atcs_by_hand():
    # 196 patches: round(0.369 * 196) = 72 leave 124; round(0.369 * 124) = 46 leave 78; round(0.369 * 78) = 29
    assert staged_schedule(197, 12, [3, 6, 9], 0.631) == [0, 0, 0, 72, 0, 0, 46, 0, 0, 29, 0, 0]
    # one rate per site: round(0.5 * 196) = 98, then round(0.25 * 98) = 24 (the class token never counts)
    assert staged_schedule(197, 12, [0, 11], [0.5, 0.75]) == [98] + [0] * 10 + [24]


def test_token_layers_count_attention_before_and_mlp_after_each_merge():
    # constant r=13 on 197 tokens: attention sees 197 - 13 l, the MLP 197 - 13 (l + 1), for l = 0..11
    expected = sum(197 - 13 * layer for layer in range(12)) + sum(197 - 13 * (layer + 1) for layer in range(12))
    assert token_layers([13] * 12, 197) == expected == 2856
    assert token_layers([0] * 3, 10) == 60


def test_keep_rate_for_equal_token_layers_reaches_the_constant_schedules_cost():
    target = token_layers([13] * 12, 197)
    rate = keep_rate_for_token_layers(target, 197, 12, [3, 6, 9])
    cost = token_layers(staged_schedule(197, 12, [3, 6, 9], rate), 197)
    assert 0.60 < rate < 0.66 and abs(cost - target) <= 6  # rounding r moves the cost in steps of a few tokens
    # no other rate on a fine grid comes closer
    best = min(abs(token_layers(staged_schedule(197, 12, [3, 6, 9], k / 1000), 197) - target) for k in range(1, 1001))
    assert abs(cost - target) == best


def test_decreasing_schedule_falls_linearly_from_one_and_a_half_r_to_half_r():
    assert decreasing_schedule(13, 12) == [int(19.5 - 13 * layer / 11) for layer in range(12)]
    assert decreasing_schedule(13, 12)[0] == 19 and decreasing_schedule(13, 12)[-1] == 6
    assert decreasing_schedule(4, 1) == [4]


def test_from_preset_with_staged_merging_merges_after_layers_3_6_and_9_only():
    config = ConformerConfig.from_preset(
        "ViT-S_16", merge_mode="ward", merge_layers=[3, 6, 9], merge_keep_rate=0.63, hidden_size=48,
        num_attention_heads=2, intermediate_size=96,
    )  # fmt: skip
    assert config.merge_r_per_layer == staged_schedule(197, 12, [3, 6, 9], 0.63)
    model = ConformerForImageClassification(config).eval()
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, 224, 224), output_hidden_states=True)
    counts = [hidden.shape[1] for hidden in outputs.hidden_states]
    changes = [layer for layer in range(12) if counts[layer + 1] != counts[layer]]
    assert changes == [3, 6, 9] and counts[-1] == 197 - sum(config.merge_r_per_layer)


def test_decreasing_schedule_config_and_a_round_trip_through_save_pretrained(tmp_path):
    shape = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=32)
    config = ConformerConfig(**shape, patch_size=4, merge_mode="bipartite", merge_r=4, merge_schedule="decreasing")
    assert config.merge_r_per_layer == [6, 4, 3, 2]
    ConformerForImageClassification(config).save_pretrained(tmp_path)
    assert ConformerForImageClassification.from_pretrained(tmp_path).config.merge_r_per_layer == [6, 4, 3, 2]


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(merge_layers=[3, 12], merge_keep_rate=0.5), "merge_layers"),
        (dict(merge_layers=[6, 3], merge_keep_rate=0.5), "increasing"),
        (dict(merge_layers=[3, 6], merge_keep_rate=[0.5]), "merge_keep_rate"),
        (dict(merge_layers=[3], merge_keep_rate=0.0), "merge_keep_rate"),
        (dict(merge_layers=[3], merge_keep_rate=float("nan")), "merge_keep_rate"),
        (dict(merge_keep_rate=0.5), "applies to `merge_layers`"),
    ],
)
def test_staged_fields_that_cannot_work_are_refused_naming_them(fields, message):
    with pytest.raises(ValueError, match=message):
        ConformerConfig.from_preset("ViT-S_16", merge_mode="ward", **fields)


def test_parse_staged_reads_the_command_lines_words():
    assert parse_staged("3,6,9", "0.63") == {"merge_layers": [3, 6, 9], "merge_keep_rate": 0.63}
    assert parse_staged("3,6", "0.5,0.7") == {"merge_layers": [3, 6], "merge_keep_rate": [0.5, 0.7]}
    with pytest.raises(ValueError, match="comma-separated"):
        parse_staged("3;6", "0.5")


def test_converter_writes_a_staged_schedule_into_config_and_card(tmp_path, google_npz):
    out = tmp_path / "out"
    argv = [
        "--npz_path",
        str(google_npz(tmp_path / "tiny.npz")),
        "--output_dir",
        str(out),
        "--merge_mode",
        "submodular",
    ]
    assert converter.main([*argv, "--merge_layers", "0", "--merge_keep_rate", "0.5"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["merge_layers"], config["merge_keep_rate"]) == ([0], 0.5)
    metadata = ModelCard.load(out / "README.md").data.to_dict()["token_merging"]
    assert metadata["merge_r_per_layer"] == [8, 0] and metadata["tokens_out"] == 17 - 8  # 16 patches, keep half


def test_training_flags_set_a_staged_schedule(tmp_path):
    model_args, _, _ = training.parse_arguments(
        ["--output_dir", str(tmp_path), "--use_cpu", "--model_type", "ViT-S_16", "--merge_mode", "ward",
         "--merge_layers", "3,6,9", "--merge_keep_rate", "0.63"]
    )  # fmt: skip
    config = training.build_config(None, model_args, labels=["a", "b"])
    assert config.merge_r_per_layer == staged_schedule(197, 12, [3, 6, 9], 0.63)
