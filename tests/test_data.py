"""image_data: decoding any image to RGB (16-bit included, bombs refused), the transforms, and the datasets."""

import struct
import zlib

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from conformer_vit import data as image_data
from conformer_vit.data import DataError, build_transforms, load_rgb_image


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares `width` x `height` 8-bit gray pixels and holds almost none: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def images(count, seed=0, size=4):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


# --------------------------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------------------------


def test_sixteen_bit_png_is_scaled_to_eight_bits_not_clipped(tmp_path):
    values = np.array([[0, 128, 129, 257, 32896, 65278, 65535, 1000]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "gray16.png")
    assert Image.open(tmp_path / "gray16.png").mode == "I;16"
    rgb = np.asarray(load_rgb_image(tmp_path / "gray16.png"))
    # round(v * 255 / 65535) = round(v / 257), worked out by hand: 128/257 = 0.498, 129/257 = 0.502, 1000/257 = 3.89
    expected = [0, 0, 1, 1, 128, 254, 255, 4]
    assert rgb.shape == (1, 8, 3)
    assert rgb[0, :, 0].tolist() == expected and (rgb[..., 0] == rgb[..., 2]).all()


def test_full_range_sixteen_bit_gradient_keeps_its_levels(tmp_path):
    gradient = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    Image.fromarray(gradient).save(tmp_path / "gradient.png")
    rgb = np.asarray(load_rgb_image(str(tmp_path / "gradient.png")))
    # 257 input levels map to each output level (128 or 129 at the two ends, where rounding halves a bin)
    counts = np.bincount(rgb[..., 0].ravel(), minlength=256)
    assert counts[0] == 129 and counts[255] == 129 and set(counts[1:255]) == {257}
    assert (rgb[..., 0] == 255).mean() < 0.003  # PIL's convert("RGB") makes 99.6% of it white


def test_thirty_two_bit_integer_mode_is_read_as_sixteen_bit():
    image = Image.fromarray(np.array([[0, 257, 65535, 70000, -5]], dtype=np.int32), "I")
    assert np.asarray(load_rgb_image(image))[0, :, 1].tolist() == [0, 1, 255, 255, 0]  # out of range clipped


@pytest.mark.parametrize(
    "mode, pixel",
    [("L", (90, 90, 90)), ("LA", (90, 90, 90)), ("RGBA", (10, 20, 30)), ("P", (10, 20, 30)), ("CMYK", None)],
)
def test_eight_bit_modes_become_rgb_with_their_colours(tmp_path, mode, pixel):
    rgba = np.zeros((4, 6, 4), dtype=np.uint8)
    rgba[...] = (10, 20, 30, 128)
    image = Image.fromarray(rgba, "RGBA")
    image = Image.fromarray(np.full((4, 6), 90, np.uint8), "L").convert(mode) if mode in ("L", "LA") else image
    image = image.convert(mode)
    path = tmp_path / ("image.jpg" if mode == "CMYK" else "image.png")
    image.save(path)
    for source in (path, str(path), path.read_bytes(), {"path": None, "bytes": path.read_bytes()}):
        rgb = load_rgb_image(source)
        assert rgb.mode == "RGB" and rgb.size == (6, 4)
        if pixel is not None:
            assert rgb.getpixel((2, 1)) == pixel


def test_palette_with_transparency_goes_through_rgba(tmp_path):
    image = Image.new("P", (3, 2))
    image.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    image.putpixel((1, 1), 1)
    image.info["transparency"] = 0
    image.save(tmp_path / "palette.png", transparency=0)
    assert load_rgb_image(tmp_path / "palette.png").getpixel((1, 1)) == (200, 100, 50)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    # 100000 x 100000 declared: past twice MAX_IMAGE_PIXELS, where PIL itself refuses to open it
    (tmp_path / "bomb.png").write_bytes(png_header_only(100_000, 100_000))
    with pytest.raises(DataError, match="bomb.png is too large to decode"):
        load_rgb_image(tmp_path / "bomb.png")
    # 10000 x 10000 = 1e8 pixels: over MAX_IMAGE_PIXELS (89478485), where PIL only warns and would allocate 100 MB
    with pytest.raises(DataError, match="10000x10000 pixels, more than PIL.Image.MAX_IMAGE_PIXELS"):
        load_rgb_image({"path": "big.png", "bytes": png_header_only(10_000, 10_000)})


def test_unreadable_and_missing_images_are_data_errors(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    with pytest.raises(DataError, match="cannot read image .*broken.png"):
        load_rgb_image(tmp_path / "broken.png")
    with pytest.raises(DataError, match="cannot read image .*absent.png"):
        load_rgb_image(tmp_path / "absent.png")
    for nothing in (None, {"path": None, "bytes": None}):
        with pytest.raises(DataError, match="has no image"):
            load_rgb_image(nothing)


# --------------------------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------------------------


def test_evaluation_transform_resizes_and_normalises_with_the_given_statistics():
    _, evaluate = build_transforms((6, 4), augment=False, mean=[0.5, 0.25, 0.0], std=[0.25, 0.5, 1.0])
    image = Image.new("RGB", (3, 3), (255, 0, 51))
    pixels = evaluate(image)
    assert pixels.shape == (3, 6, 4)
    # (255/255 - 0.5) / 0.25 = 2; (0 - 0.25) / 0.5 = -0.5; (51/255 - 0) / 1 = 0.2
    torch.testing.assert_close(pixels.mean(dim=(1, 2)), torch.tensor([2.0, -0.5, 0.2]))


def test_augmentation_is_random_and_seeded():
    train, evaluate = build_transforms(8, augment=True, mean=[0.5] * 3, std=[0.5] * 3)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 20, 3), dtype=np.uint8))
    torch.manual_seed(1)
    first = train(image)
    torch.manual_seed(1)
    assert torch.equal(train(image), first) and first.shape == (3, 8, 8)
    assert not torch.equal(train(image), first)
    assert not torch.equal(evaluate(image), first)


def test_examples_become_pixel_values_and_labels_with_augmentation_seeded_per_example():
    dataset = datasets.Dataset.from_dict({"image": images(6, size=20), "label": [0, 1, 0, 1, 0, None]})
    train, evaluate = build_transforms(8, augment=True, mean=[0.0] * 3, std=[1.0] * 3)
    split = image_data.TransformedDataset(dataset, train, seed=3)
    first = [split[index]["pixel_values"] for index in range(3)]
    torch.manual_seed(123)  # whatever the global generator's state, or the order the examples are read in
    state = torch.random.get_rng_state()
    assert all(torch.equal(split[index]["pixel_values"], first[index]) for index in (2, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), state)  # and it is left alone
    split.set_epoch(1)
    assert not torch.equal(split[0]["pixel_values"], first[0])  # a new epoch, new crops
    assert not torch.equal(image_data.TransformedDataset(dataset, train, seed=4)[0]["pixel_values"], first[0])

    batch = image_data.collate_fn([split[0], split[1]])
    assert batch["pixel_values"].shape == (2, 3, 8, 8) and batch["labels"].tolist() == [0, 1]
    with pytest.raises(DataError, match="example 5 has no label"):
        split[5]
    plain = image_data.TransformedDataset(dataset, evaluate)[1]["pixel_values"]
    resized = evaluate(dataset[1]["image"])
    assert torch.equal(plain, resized)


# --------------------------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------------------------


def test_digits_are_rgb_images_with_a_fixed_stratified_split():
    first, second = image_data.load_digits_dataset(), image_data.load_digits_dataset()
    assert (len(first["train"]), len(first["validation"])) == (1437, 360)
    assert first["train"].features["label"].names == [str(d) for d in range(10)]
    assert first["validation"]["label"] == second["validation"]["label"]  # every process builds the same split
    image = first["train"][0]["image"]
    assert image.mode == "RGB" and image.size == (8, 8)
    assert np.bincount(first["validation"]["label"]).min() >= 35  # stratified: every digit is evaluated


def test_digits_tensors_equal_the_transformed_split():
    (train_x, train_y), (eval_x, eval_y) = image_data.digits_tensors(16)
    assert train_x.shape == (1437, 3, 16, 16) and eval_x.shape == (360, 3, 16, 16)
    assert train_x.min() == -1.0 and train_x.max() == 1.0  # ViTImageProcessor's mean and std 0.5: [0, 1] -> [-1, 1]
    assert eval_y.tolist() == image_data.load_digits_dataset()["validation"]["label"]


def test_string_labels_become_one_sorted_class_label_and_a_stratified_split():
    labels = ["dog", "cat"] * 10
    dataset = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"img": images(20), "fine_label": labels}).cast_column("img", datasets.Image())
    )
    prepared = image_data.prepare_splits(dataset, train_val_split=0.2, seed=0)
    assert prepared["train"].features["label"].names == ["cat", "dog"]
    assert sorted(prepared["validation"]["label"]) == [0, 0, 1, 1]  # 20% of each class
    assert set(prepared["train"][0]["image"]) == {"path", "bytes"}  # left undecoded for load_rgb_image


@pytest.mark.parametrize("column", ["image", "label"])
def test_none_image_or_label_is_refused_before_training(column):
    values = {"image": images(4), "label": [0, 1, 0, 1]}
    values[column][2] = None
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    dataset = datasets.DatasetDict(train=datasets.Dataset.from_dict(values, features=features))
    with pytest.raises(DataError, match=f"1 example\\(s\\) of the train split have no {column}"):
        image_data.prepare_splits(dataset)


def test_missing_column_and_folder_errors_name_what_exists(tmp_path):
    dataset = datasets.DatasetDict(train=datasets.Dataset.from_dict({"image": images(2), "label": [0, 1]}))
    with pytest.raises(DataError, match="'fine' is not a column .*image, label"):
        image_data.prepare_splits(dataset, label_column="fine")
    with pytest.raises(DataError, match="is not a folder"):
        image_data.load_image_folders(str(tmp_path / "absent"), None)
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="holds no images"):
        image_data.load_image_folders(str(tmp_path), None)


def test_a_dataset_saved_empty_is_one_data_error(tmp_path):
    datasets.DatasetDict(validation=datasets.Dataset.from_dict({"label": [1]}).select([])).save_to_disk(tmp_path / "e")
    with pytest.raises(DataError, match="holds no images"):
        image_data.load_named_dataset(str(tmp_path / "e"))
