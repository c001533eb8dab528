"""Attention rollout and merge maps (visualize_attention.py): the numbers, then the command."""

import pytest
import torch
from PIL import Image

from configuration_conformer import ConformerConfig
from modeling_conformer import ConformerForImageClassification
from visualize_attention import (
    attention_rollout,
    expand_to_original_tokens,
    main,
    merge_map,
    rollout_map,
    token_sizes_from_source_map,
    trace_model,
)

GRID = (8, 8)  # image 32, patch 4


def tiny_model(merge_mode="none", merge_r=0, seed=0):
    torch.manual_seed(seed)
    config = ConformerConfig(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=4,
        num_labels=3,
        merge_mode=merge_mode,
        merge_r=merge_r,
    )
    return ConformerForImageClassification._from_config(config, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def pixel_values():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def plain_rollout(attentions):
    """Abnar & Zuidema's rollout written out for tokens that never merge."""
    rollout = torch.eye(attentions[0].shape[-1]).expand(attentions[0].shape[0], -1, -1)
    for attention in attentions:
        layer_matrix = attention.mean(dim=1) + torch.eye(attention.shape[-1])
        layer_matrix = layer_matrix / layer_matrix.sum(dim=-1, keepdim=True)
        rollout = layer_matrix @ rollout
    return rollout


def test_rollout_equals_plain_rollout_without_merging(pixel_values):
    trace = trace_model(tiny_model(), pixel_values)
    expected = plain_rollout(trace.attentions)
    torch.testing.assert_close(attention_rollout(trace.attentions, trace.source_maps[:-1]), expected)
    torch.testing.assert_close(attention_rollout(trace.attentions), expected)


@pytest.mark.parametrize("merge_mode", ["none", "bipartite", "submodular"])
def test_rollout_rows_sum_to_one_and_map_covers_patch_grid(pixel_values, merge_mode):
    trace = trace_model(tiny_model(merge_mode, merge_r=8), pixel_values)
    rollout = attention_rollout(trace.attentions, trace.source_maps[:-1])
    assert rollout.shape == (2, 1 + 64, 1 + 64)
    assert (rollout >= 0).all()
    torch.testing.assert_close(rollout.sum(dim=-1), torch.ones(2, 65))
    heat = rollout_map(rollout, GRID)
    assert heat.shape == (2, *GRID)
    torch.testing.assert_close(heat.flatten(1), rollout[:, 0, 1:])


def test_expansion_worked_by_hand():
    # Class token alone (token 0); both patches merged into token 1.
    matrix = torch.tensor([[[0.6, 0.4], [0.2, 0.8]]])
    source_map = torch.tensor([[0, 1, 1]])
    expected = torch.tensor([[[0.6, 0.2, 0.2], [0.2, 0.4, 0.4], [0.2, 0.4, 0.4]]])
    torch.testing.assert_close(expand_to_original_tokens(matrix, source_map), expected)


def test_rollout_after_a_merge_equals_token_space_rollout_carried_once(pixel_values):
    # Merging only in layer 0: layers 1 and 2 share one source map, so carrying each layer back to the patches and
    # multiplying equals multiplying in token space and carrying the product back once (as the docstring claims).
    trace = trace_model(tiny_model("submodular", merge_r=[20, 0, 0]), pixel_values)
    source_map = trace.source_maps[1]
    token_space = plain_rollout(trace.attentions[1:])
    torch.testing.assert_close(
        attention_rollout(trace.attentions[1:], trace.source_maps[1:3]),
        expand_to_original_tokens(token_space, source_map),
    )


@pytest.mark.parametrize("merge_mode", ["bipartite", "submodular"])
def test_token_sizes_counted_from_source_maps_are_the_models(pixel_values, merge_mode):
    trace = trace_model(tiny_model(merge_mode, merge_r=8), pixel_values)
    assert [sizes.shape[1] for sizes in trace.token_sizes] == [65, 57, 49, 41]
    for source_map, sizes in zip(trace.source_maps, trace.token_sizes):
        torch.testing.assert_close(token_sizes_from_source_map(source_map, sizes.shape[1]), sizes.float())


@pytest.mark.parametrize("merge_mode", ["bipartite", "submodular"])
def test_merge_map_partitions_patches_into_final_tokens(pixel_values, merge_mode):
    model = tiny_model(merge_mode, merge_r=8)
    with torch.no_grad():
        outputs = model(pixel_values, output_merge_info=True)
    labels = merge_map(outputs.source_map, GRID)
    assert labels.shape == (2, *GRID)
    num_tokens = outputs.token_sizes.shape[1]
    for image in range(2):
        # Every final token but the class token holds at least one patch, and holds as many as its size says.
        counts = torch.bincount(labels[image].flatten(), minlength=num_tokens)
        assert counts[0] == 0 and (counts[1:] > 0).all()
        torch.testing.assert_close(counts[1:].float(), outputs.token_sizes[image, 1:])


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_conformer")
    tiny_model().save_pretrained(folder)
    return folder


def test_cli_writes_png_with_rollout_and_both_merge_maps(model_folder, tmp_path, capsys):
    output = tmp_path / "figures" / "attention.png"
    assert main(["--model", str(model_folder), "--image", "sample", "--output", str(output), "--compare-modes"]) == 0
    with Image.open(output) as picture:
        assert picture.format == "PNG"
        width, height = picture.size
    assert 1000 < width < 1600 and 250 < height < 500  # four panels side by side


def test_cli_draws_image_file_up_to_a_layer(model_folder, tmp_path):
    image_path = tmp_path / "photo.jpg"
    Image.new("RGB", (40, 30), (200, 120, 40)).save(image_path)
    output = tmp_path / "out.png"
    assert (
        main(["--model", str(model_folder), "--image", str(image_path), "--output", str(output), "--layer", "0"]) == 0
    )
    with Image.open(output) as picture:
        assert picture.format == "PNG" and picture.size[0] > picture.size[1]  # image and rollout


@pytest.mark.parametrize("problem", ["missing image", "not an image", "missing model", "layer out of range"])
def test_cli_bad_input_is_one_line_error(model_folder, tmp_path, capsys, problem):
    image, model, extra = "sample", str(model_folder), []
    if problem == "missing image":
        image = str(tmp_path / "nope.png")
    elif problem == "not an image":
        (tmp_path / "notes.png").write_text("not a picture")
        image = str(tmp_path / "notes.png")
    elif problem == "missing model":
        model = str(tmp_path / "no_model")
    else:
        extra = ["--layer", "3"]
    status = main(["--model", model, "--image", image, "--output", str(tmp_path / "out.png"), *extra])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "out.png").exists()
