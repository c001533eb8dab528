"""Attention rollout and merge maps (visualize_attention.py): the numbers, then the command."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from configuration_conformer import MERGE_MODES, ConformerConfig
from modeling_conformer import ConformerForImageClassification, ConformerModel
from visualize_attention import (
    attention_rollout,
    default_merge_r,
    expand_to_original_tokens,
    load_image,
    main,
    merge_map,
    rollout_map,
    token_sizes_from_source_map,
    trace_model,
)

GRID = (8, 8)  # image 32, patch 4
MERGING_MODES = [mode for mode in MERGE_MODES if mode != "none"]


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


@pytest.mark.parametrize("merge_mode", MERGE_MODES)
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


@pytest.mark.parametrize("merge_mode", MERGING_MODES)
def test_rollout_after_a_merge_equals_token_space_rollout_carried_once(pixel_values, merge_mode):
    # Merging only in layer 0: layers 1 and 2 share one source map, so carrying each layer back to the patches and
    # multiplying equals multiplying in token space and carrying the product back once (as the docstring claims).
    trace = trace_model(tiny_model(merge_mode, merge_r=[20, 0, 0]), pixel_values)
    source_map = trace.source_maps[1]
    token_space = plain_rollout(trace.attentions[1:])
    torch.testing.assert_close(
        attention_rollout(trace.attentions[1:], trace.source_maps[1:3]),
        expand_to_original_tokens(token_space, source_map),
    )


@pytest.mark.parametrize("merge_mode", MERGING_MODES)
def test_trace_has_each_layers_tokens_and_sizes_counted_from_its_source_maps(pixel_values, merge_mode):
    trace = trace_model(tiny_model(merge_mode, merge_r=8), pixel_values)
    assert [attention.shape[-1] for attention in trace.attentions] == [65, 57, 49]
    torch.testing.assert_close(trace.source_maps[0], torch.arange(65).expand(2, -1))
    for layer, attention in enumerate(trace.attentions):  # every token entering a layer holds an original token
        sizes = token_sizes_from_source_map(trace.source_maps[layer], attention.shape[-1])
        assert (sizes > 0).all() and (sizes.sum(1) == 65).all()


@pytest.mark.parametrize("merge_mode", MERGING_MODES)
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
    torch.testing.assert_close(token_sizes_from_source_map(outputs.source_map, num_tokens), outputs.token_sizes)


def test_default_merge_r_is_lowered_where_bipartite_runs_out_of_tokens():
    # 8 patches, 2 layers, all of them asked for: r = 4 per layer. Layer 0 has 9 tokens, of which bipartite matching
    # can remove 4 (set A holds 5, one the class token); layer 1 has 5 tokens, set A 3, so 2 (ward could remove 3).
    assert default_merge_r(8, 2, MERGING_MODES, share=1.0) == [4, 2]
    assert default_merge_r(8, 2, ["ward"], share=1.0) == [4, 3]
    assert default_merge_r(64, 4, MERGING_MODES) == [12, 12, 12, 12]


def test_sixteen_bit_png_keeps_its_grey_levels(tmp_path):
    path = tmp_path / "gradient16.png"
    levels = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)  # 0, 1, 128 and 255 in 8 bits
    Image.fromarray(levels).save(path)
    with Image.open(path) as saved:
        assert saved.mode.startswith("I")  # stored as 16 bits
    image, caption = load_image(str(path))
    assert caption == "gradient16.png"
    np.testing.assert_array_equal(np.asarray(image)[0, :, 0], [0, 1, 128, 255])


def test_digits_images_come_with_their_labels():
    image, caption = load_image("digits:0")
    assert image.size == (8, 8) and image.mode == "RGB"
    assert caption.startswith("digits:0 (a ") and caption[-2].isdigit()


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_conformer")
    tiny_model().save_pretrained(folder)
    return folder


def png_size(path):
    with Image.open(path) as picture:
        assert picture.format == "PNG"
        return picture.size


def test_cli_draws_rollout_and_every_modes_merge_map_one_row_per_image(model_folder, tmp_path):
    output = tmp_path / "figures" / "attention.png"
    argv = ["--model", str(model_folder), "--output", str(output), "--compare-modes", "--image", "sample", "digits:3"]
    assert main(argv) == 0
    width, height = png_size(output)
    num_panels = 2 + len(MERGING_MODES)  # image, rollout, one merge map per mode
    assert 250 * num_panels < width < 400 * num_panels and 2 * 250 < height < 2 * 450


def test_cli_draws_image_file_up_to_a_layer(model_folder, tmp_path):
    image_path = tmp_path / "photo.jpg"
    Image.new("RGB", (40, 30), (200, 120, 40)).save(image_path)
    output = tmp_path / "out.png"
    assert (
        main(["--model", str(model_folder), "--image", str(image_path), "--output", str(output), "--layer", "0"]) == 0
    )
    width, height = png_size(output)
    assert width > height  # image and rollout side by side


def read_only_folder(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    if os.access(folder, os.W_OK):  # root ignores permission bits
        return Path("/sys")  # sysfs refuses new files, root's included
    return folder


BAD_INPUTS = [
    "missing image",
    "not an image",
    "decompression bomb",
    "bad digits index",
    "missing model",
    "layer out of range",
    "negative merge_r",
    "merge_r too large",
    "output is a folder",
    "output under a file",
    "output read-only",
    "unknown option",
    "no --model",
]


@pytest.mark.parametrize("problem", BAD_INPUTS)
def test_cli_bad_input_is_one_line_error(model_folder, tmp_path, capsys, monkeypatch, problem):
    image, model, output, extra = "sample", str(model_folder), tmp_path / "out.png", []
    if problem == "missing image":
        image = str(tmp_path / "nope.png")
    elif problem == "not an image":
        (tmp_path / "notes.png").write_text("not a picture")
        image = str(tmp_path / "notes.png")
    elif problem == "decompression bomb":
        Image.new("RGB", (40, 30)).save(tmp_path / "big.png")
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL's own limit, lowered to fit a test
        image = str(tmp_path / "big.png")
    elif problem == "bad digits index":
        image = "digits:100000"
    elif problem == "missing model":
        model = str(tmp_path / "no_model")
    elif problem == "layer out of range":
        extra = ["--layer", "3"]
    elif problem == "negative merge_r":
        extra = ["--compare-modes", "--merge-r", "-1"]
    elif problem == "merge_r too large":
        extra = ["--compare-modes", "--merge-r", "40"]  # bipartite removes at most 32 of the 65 tokens of layer 0
    elif problem == "output is a folder":
        output = tmp_path
    elif problem == "output under a file":
        (tmp_path / "file.txt").write_text("the user's notes")
        output = tmp_path / "file.txt" / "out.png"
    elif problem == "output read-only":
        output = read_only_folder(tmp_path) / "out.png"
    elif problem == "unknown option":
        extra = ["--colour", "blue"]
    status = main(
        ["--model", model, "--image", image, "--output", str(output), *extra][2 * (problem == "no --model") :]
    )
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not output.is_file()
    if problem == "output under a file":
        assert (tmp_path / "file.txt").read_text() == "the user's notes"


@pytest.mark.parametrize("target", ["the input image", "the model's weights", "a picture of the user's"])
def test_cli_never_draws_over_an_input_or_a_file_it_did_not_draw(model_folder, tmp_path, capsys, target):
    """The data-loss cases: --output onto the input image, onto the model's weights, onto a PNG this tool did not
    draw. Each is one error line and the file is left as it was."""
    image = tmp_path / "photo.png"
    Image.new("RGB", (40, 30), (200, 120, 40)).save(image)
    user_png = tmp_path / "holiday.png"
    Image.new("RGB", (8, 8)).save(user_png)
    output = {"the input image": image, "the model's weights": model_folder / "model.safetensors"}.get(target, user_png)
    before = output.read_bytes()
    assert main(["--model", str(model_folder), "--image", str(image), "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --output") and err.count("\n") == 1, err
    assert output.read_bytes() == before


def test_cli_replaces_a_picture_it_drew_itself(model_folder, tmp_path):
    output = tmp_path / "attention.png"
    argv = ["--model", str(model_folder), "--image", "digits:1", "--output", str(output)]
    assert main(argv) == 0 and main(argv) == 0 and png_size(output)


# --------------------------------------------------------------------------------------------------------------------
# transformers' ViT family: prefix tokens first (DeiT's distillation token, DINOv2's registers), or none (SigLIP)
# --------------------------------------------------------------------------------------------------------------------

FAMILY_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
FAMILY = {  # class name -> (config class, extra config kwargs, prefix tokens)
    "DeiTForImageClassificationWithTeacher": ("DeiTConfig", {"intermediate_size": 64, "num_labels": 3}, 2),
    "Dinov2WithRegistersModel": ("Dinov2WithRegistersConfig", {"num_register_tokens": 2}, 3),
    "SiglipVisionModel": ("SiglipVisionConfig", {"intermediate_size": 64}, 0),
}
FAMILY_GRID = (4, 4)  # image 32, patch 8


def family_source(name):
    """A small transformers model of `name` with every parameter randomised (so that norms and layer scale matter)."""
    import transformers

    config_class, extra, _ = FAMILY[name]
    config = getattr(transformers, config_class)(**FAMILY_TINY, **extra, attn_implementation="eager")
    torch.manual_seed(0)
    source = getattr(transformers, name)(config).eval()
    with torch.no_grad():
        for parameter in source.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return source


@pytest.fixture(scope="module")
def family_sources():
    return {name: family_source(name) for name in FAMILY}


def family_model(source, **merging):
    """The source with merging: a classifier where it has a head, a `ConformerModel` for a backbone."""
    model_class = ConformerForImageClassification if "ForImage" in type(source).__name__ else ConformerModel
    return model_class.from_transformers(source, attn_implementation="eager", **merging).eval()


@pytest.mark.parametrize("name", list(FAMILY))
def test_family_rollout_without_merging_is_plain_rollout_of_the_sources_attention(family_sources, pixel_values, name):
    source = family_sources[name]
    with torch.no_grad():
        source_attentions = source(pixel_values, output_attentions=True).attentions
    expected = plain_rollout(source_attentions)
    trace = trace_model(family_model(source), pixel_values)
    rollout = attention_rollout(trace.attentions, trace.source_maps[:-1])
    torch.testing.assert_close(rollout, expected, atol=1e-5, rtol=1e-4)
    # The query: the class token's row where there is one, else the mean of all rows; the patches are the last 16.
    query = expected[:, 0] if FAMILY[name][2] else expected.mean(dim=1)
    torch.testing.assert_close(
        rollout_map(rollout, FAMILY_GRID, class_token=bool(FAMILY[name][2])).flatten(1), query[:, -16:]
    )


@pytest.mark.parametrize("merge_mode", MERGING_MODES)
@pytest.mark.parametrize("name", list(FAMILY))
def test_family_rollout_rows_sum_to_one_and_merge_map_partitions_the_patches(
    family_sources, pixel_values, name, merge_mode
):
    prefix = FAMILY[name][2]
    model = family_model(family_sources[name], merge_mode=merge_mode, merge_r=3)
    trace = trace_model(model, pixel_values)
    rollout = attention_rollout(trace.attentions, trace.source_maps[:-1])
    assert rollout.shape == (2, prefix + 16, prefix + 16) and (rollout >= 0).all()
    torch.testing.assert_close(rollout.sum(dim=-1), torch.ones(2, prefix + 16))
    heat = rollout_map(rollout, FAMILY_GRID, class_token=bool(prefix))
    assert heat.shape == (2, *FAMILY_GRID) and (heat > 0).all()

    final_map = trace.source_maps[-1]
    num_tokens = prefix + 16 - 6  # r = 3 in each of 2 layers
    labels = merge_map(final_map, FAMILY_GRID)
    sizes = token_sizes_from_source_map(final_map, num_tokens)
    for image in range(2):
        # The prefix tokens hold no patch; every other final token holds at least one, as many as its size says.
        counts = torch.bincount(labels[image].flatten(), minlength=num_tokens)
        assert (counts[:prefix] == 0).all() and (counts[prefix:] > 0).all()
        torch.testing.assert_close(counts[prefix:].float(), sizes[image, prefix:])


@pytest.fixture(scope="module")
def family_folders(family_sources, tmp_path_factory):
    folders = {}
    for name, source in family_sources.items():
        folders[name] = tmp_path_factory.mktemp(name)
        source.save_pretrained(folders[name])
    return folders


@pytest.mark.parametrize("name", list(FAMILY))
def test_cli_draws_a_transformers_folder_of_the_family(family_folders, tmp_path, name):
    output = tmp_path / "family.png"
    argv = ["--model", str(family_folders[name]), "--output", str(output), "--compare-modes", "--image", "digits:0"]
    assert main(argv) == 0
    width, height = png_size(output)
    num_panels = 2 + len(MERGING_MODES)
    assert 250 * num_panels < width < 400 * num_panels and 250 < height < 450
    assert sorted(path.name for path in family_folders[name].iterdir()) == ["config.json", "model.safetensors"]


def test_cli_draws_a_conformer_folder_converted_from_the_family_with_its_own_merging(family_sources, tmp_path):
    folder = tmp_path / "conformer_dinov2"
    family_model(family_sources["Dinov2WithRegistersModel"], merge_mode="ward", merge_r=3).save_pretrained(folder)
    output = tmp_path / "converted.png"
    assert main(["--model", str(folder), "--output", str(output), "--image", "sample"]) == 0
    width, height = png_size(output)
    assert 3 * 250 < width < 3 * 400  # image, rollout, the model's own merge map


def test_cli_refuses_a_folder_outside_the_family_in_one_line(tmp_path, capsys):
    from transformers import ResNetConfig, ResNetModel

    folder = tmp_path / "resnet"
    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])).save_pretrained(folder)
    output = tmp_path / "out.png"
    status = main(["--model", str(folder), "--image", "sample", "--output", str(output)])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "'resnet'" in err and "ResNetModel" in err and "DeiTModel" in err and "SiglipVisionModel" in err
    assert not output.exists()


def test_a_non_square_image_is_said_to_be_stretched_in_one_line(model_folder, tmp_path, capsys):
    image = tmp_path / "wide.png"
    Image.new("RGB", (200, 120), (10, 200, 40)).save(image)
    assert main(["--model", str(model_folder), "--image", str(image), "--output", str(tmp_path / "a.png")]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes == ["note: a 200x120 image is resized to 32x32, not keeping its aspect ratio"]
