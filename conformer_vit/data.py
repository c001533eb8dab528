"""Images for classification: scikit-learn's bundled digits, image folders and Hub datasets as one `DatasetDict`
(`train` and `validation` splits of `{"image": undecoded datasets.Image, "label": ClassLabel}`), images decoded to RGB
whatever their mode or bit depth, and the training and evaluation transforms.

The training script, the benchmarks and the pictures import it; it imports no project code.
"""

import io
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import datasets
import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, load_dataset, load_from_disk
from PIL import Image
from torchvision.transforms import Compose, Normalize, RandomHorizontalFlip, RandomResizedCrop, Resize, ToTensor
from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
IMAGE_COLUMN_NAMES = ("image", "img", "pixel_values")  # tried in order when no image column is given
LABEL_COLUMN_NAMES = ("label", "labels", "fine_label")  # CIFAR-100's fine labels before its coarse ones
EVAL_SPLIT_NAMES = ("validation", "valid", "val", "test")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # PIL's modes for 16-bit grayscale (PNG, PGM, TIFF)


class DataError(ValueError):
    """Data that cannot be used (a missing folder or column, an unreadable or oversized image), with a message that
    says which and why; command-line tools print it as one `error: ...` line."""


# --------------------------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------------------------


def load_rgb_image(image) -> Image.Image:
    """An RGB PIL image from a path, encoded bytes, an undecoded `datasets.Image` value (`{"path", "bytes"}`) or a PIL
    image of any mode.

    16-bit grayscale (PIL modes `I;16*` and `I`) is scaled to 8 bits as `round(v * 255 / 65535)`: PIL's own
    `convert("RGB")` clips it instead, so that all but the darkest 1/256 of the range becomes white. An image of more
    than `PIL.Image.MAX_IMAGE_PIXELS` pixels (a decompression bomb) raises `DataError` before it is decoded, as does a
    file PIL cannot read.
    """
    name = _describe(image)
    try:
        if not isinstance(image, Image.Image):
            image = _open(image)
        _check_size(image, name)
        image.load()
    except Image.DecompressionBombError as error:  # PIL refuses twice MAX_IMAGE_PIXELS itself, while opening
        raise DataError(f"image {name} is too large to decode ({error})") from None
    except (OSError, ValueError, SyntaxError) as error:  # UnidentifiedImageError and truncated files are OSErrors
        if isinstance(error, DataError):
            raise
        raise DataError(f"cannot read image {name}: {error}") from None
    if image.mode in SIXTEEN_BIT_MODES:
        pixels = np.asarray(image, dtype=np.float64).clip(0, 65535)
        image = Image.fromarray(np.round(pixels * (255 / 65535)).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL asks palette images with transparency to go through RGBA
    return image if image.mode == "RGB" else image.convert("RGB")


def _open(image) -> Image.Image:
    if isinstance(image, dict):
        image = image["bytes"] if image.get("bytes") is not None else image.get("path")
    if image is None:
        raise DataError("an example has no image (its image is None)")
    with warnings.catch_warnings():  # over MAX_IMAGE_PIXELS, PIL warns while opening; _check_size raises instead
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(image) if isinstance(image, bytes) else image)


def _check_size(image: Image.Image, name: str):
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and image.width * image.height > limit:
        raise DataError(
            f"image {name} is {image.width}x{image.height} pixels, more than PIL.Image.MAX_IMAGE_PIXELS ({limit}): "
            "refused as a possible decompression bomb"
        )


def _describe(image) -> str:
    if isinstance(image, dict):
        image = image.get("path") or (None if image.get("bytes") is None else b"")
    if isinstance(image, (str, Path)):
        return str(image)
    return getattr(image, "filename", None) or "(embedded bytes)"


# --------------------------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------------------------


def build_transforms(
    image_size: int | tuple[int, int], augment: bool, mean: list[float], std: list[float]
) -> tuple[Callable, Callable]:
    """(training, evaluation) transforms from a PIL image to a normalised `[3, height, width]` tensor.

    Evaluation resizes (bilinear, as `ViTImageProcessor`); training adds, with `augment`, the original ViT recipe's
    random resized crop (scale 0.05-1) and horizontal flip, and is the evaluation transform otherwise. `image_size`,
    `mean` and `std` are the image processor's, so that training sees what `pipeline()` will feed the model.
    """
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    normalize = Normalize(mean=mean, std=std)
    eval_transform = Compose([Resize(size), ToTensor(), normalize])
    if not augment:
        return eval_transform, eval_transform
    train_transform = Compose(
        [RandomResizedCrop(size, scale=(0.05, 1.0)), RandomHorizontalFlip(), ToTensor(), normalize]
    )
    return train_transform, eval_transform


class TransformedDataset(torch.utils.data.Dataset):
    """A split of `{"image", "label"}` examples as `{"pixel_values", "labels"}`, each image decoded by
    `load_rgb_image` and transformed under its own random seed, drawn from (`seed`, epoch, example index).

    The crops and flips of an example therefore do not depend on which process or DataLoader worker reads it, nor on
    what ran before: a run resumed from a checkpoint augments exactly as the uninterrupted run did. The Trainer (through
    accelerate's data loader) calls `set_epoch` before each epoch, so every epoch sees new crops.
    """

    def __init__(self, dataset: Dataset, transform: Callable, seed: int = 0):
        self.dataset, self.transform, self.seed, self.epoch = dataset, transform, seed, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        example = self.dataset[index]
        if example["label"] is None:
            raise DataError(f"example {index} has no label (its label is None)")
        image = load_rgb_image(example["image"])
        example_seed = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0]
        with torch.random.fork_rng(devices=[]):  # leaves the global generator as it was
            torch.manual_seed(int(example_seed))
            pixel_values = self.transform(image)
        return {"pixel_values": pixel_values, "labels": example["label"]}


def collate_fn(examples: list[dict]) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": torch.tensor([example["labels"] for example in examples]),
    }


# --------------------------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------------------------


def load_digits_dataset(test_size: float = 0.2, seed: int = 0) -> DatasetDict:
    """scikit-learn's bundled 1797 8x8 digits as RGB images with a `ClassLabel`, split 80/20 the same way every time
    (stratified, fixed seed), so every process of a distributed run sees the same split without a download."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)  # [n, 8, 8], 0..16 -> 0..255
    images = [Image.fromarray(np.repeat(digit[..., None], 3, axis=-1)) for digit in pixels]  # gray as RGB
    features = Features({"image": datasets.Image(), "label": ClassLabel(names=[str(d) for d in range(10)])})
    train_index, eval_index = train_test_split(
        np.arange(len(images)), test_size=test_size, random_state=seed, stratify=digits.target
    )

    def subset(index):
        return Dataset.from_dict(
            {"image": [images[i] for i in index], "label": digits.target[index].tolist()}, features=features
        )

    return DatasetDict(train=subset(train_index), validation=subset(eval_index))


def load_named_dataset(
    name: str, config_name: str | None = None, cache_dir: str | None = None, token: str | None = None
) -> DatasetDict:
    """A `save_to_disk` folder, or a dataset from the Hub (`cifar10`, `cifar100`, `user/name`, ...)."""
    if os.path.isdir(name) and any(os.path.isfile(os.path.join(name, f)) for f in ("dataset_dict.json", "state.json")):
        try:
            dataset = load_from_disk(name)
        except IndexError:  # datasets' own error for a split saved without any rows
            raise DataError(f"the saved dataset {name!r} has a split without data files: it holds no images") from None
        except (ValueError, OSError) as error:  # truncated or foreign files
            raise DataError(f"cannot read the saved dataset {name!r}: {error or type(error).__name__}") from None
        return dataset if isinstance(dataset, DatasetDict) else DatasetDict(train=dataset)
    try:
        return load_dataset(name, config_name, cache_dir=cache_dir, token=token)
    except Exception as error:  # datasets raises many types (offline, not found, gated, bad config): report them all
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(
            f"cannot load dataset {name!r}: {reason} (use `digits`, `cifar10`, `cifar100`, a Hub dataset id, a "
            "save_to_disk folder, or image folders)"
        ) from None


def load_image_folders(train_dir: str | None, validation_dir: str | None, cache_dir: str | None = None) -> DatasetDict:
    """`imagefolder` datasets: labels from the sub-folder names."""
    data_files = {}
    for split, flag, folder in (
        ("train", "--train_dir", train_dir),
        ("validation", "--validation_dir", validation_dir),
    ):
        if folder is None:
            continue
        if not os.path.isdir(folder):
            raise DataError(f"{flag} {folder!r} is not a folder.")
        if not any(name.lower().endswith(IMAGE_EXTENSIONS) for _, _, names in os.walk(folder) for name in names):
            raise DataError(
                f"{flag} {folder!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}); put them in one sub-folder per "
                "class."
            )
        data_files[split] = os.path.join(os.path.abspath(folder), "**")
    return load_dataset("imagefolder", data_files=data_files, cache_dir=cache_dir)


def _pick_column(features: Features, given: str | None, candidates: tuple[str, ...], kind: type, flag: str) -> str:
    if given is not None:
        if given not in features:
            raise DataError(f"{flag} {given!r} is not a column of the dataset; its columns: {', '.join(features)}.")
        return given
    for name in candidates:
        if name in features:
            return name
    for name, feature in features.items():
        if isinstance(feature, kind):
            return name
    raise DataError(f"cannot tell which column to use; give {flag} (the dataset's columns: {', '.join(features)}).")


def _encode_labels(dataset: DatasetDict) -> DatasetDict:
    """Make `label` a `ClassLabel` with one set of names for all splits (strings or ints sorted)."""
    feature = next(iter(dataset.values())).features["label"]
    if isinstance(feature, ClassLabel):
        return dataset
    values = sorted({value for data in dataset.values() for value in data["label"]}, key=str)
    index = {value: i for i, value in enumerate(values)}
    new_features = next(iter(dataset.values())).features.copy()
    new_features["label"] = ClassLabel(names=[str(value) for value in values])
    return DatasetDict(
        {
            split: data.map(lambda batch: {"label": [index[v] for v in batch["label"]]}, batched=True).cast(
                new_features
            )
            for split, data in dataset.items()
        }
    )


def prepare_splits(
    dataset: DatasetDict,
    image_column: str | None = None,
    label_column: str | None = None,
    train_val_split: float = 0.15,
    seed: int = 0,
) -> DatasetDict:
    """Pick the image and label columns, name them `image` and `label`, and make `train` and `validation` splits
    (the first of `EVAL_SPLIT_NAMES`, or a stratified `train_val_split` of the training split). Images stay undecoded,
    so that an unreadable file is reported by name when it is used."""
    if "train" not in dataset and not any(name in dataset for name in EVAL_SPLIT_NAMES):
        raise DataError(f"the dataset has no train or validation split; its splits: {', '.join(dataset)}.")
    splits = {"train": dataset["train"]} if "train" in dataset else {}
    eval_name = next((name for name in EVAL_SPLIT_NAMES if name in dataset), None)
    if eval_name is not None:
        splits["validation"] = dataset[eval_name]
    features = next(iter(splits.values())).features
    image_column = _pick_column(features, image_column, IMAGE_COLUMN_NAMES, datasets.Image, "--image_column_name")
    label_column = _pick_column(features, label_column, LABEL_COLUMN_NAMES, ClassLabel, "--label_column_name")
    if not isinstance(features[image_column], datasets.Image):
        raise DataError(f"column {image_column!r} does not hold images; give --image_column_name.")
    renames = {image_column: "image", label_column: "label"}
    dataset = DatasetDict(
        {
            split: data.select_columns([image_column, label_column]).rename_columns(
                {old: new for old, new in renames.items() if old != new}
            )
            for split, data in splits.items()
        }
    )
    for split, data in dataset.items():  # Arrow counts the None values without reading the data
        for column in ("image", "label"):
            if missing := data.data.column(column).null_count:
                raise DataError(f"{missing} example(s) of the {split} split have no {column} (None in {column!r}).")
    dataset = _encode_labels(dataset)
    labels = next(iter(dataset.values())).features["label"].names
    if len(labels) < 2:
        raise DataError(
            f"the dataset has {len(labels)} class(es) ({', '.join(labels)}); classification needs two or more."
        )
    if "validation" not in dataset and "train" in dataset and train_val_split > 0:
        # The same seed in every process, so that a distributed run agrees on the split.
        split = dataset["train"].train_test_split(test_size=train_val_split, seed=seed, stratify_by_column="label")
        dataset = DatasetDict(train=split["train"], validation=split["test"])
    return dataset.cast_column("image", datasets.Image(decode=False))


def load_image_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_dir: str | None = None,
    validation_dir: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    train_val_split: float = 0.15,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    seed: int = 0,
    cache_dir: str | None = None,
    token: str | None = None,
) -> DatasetDict:
    """Image folders, the digits (`dataset_name` None or `"digits"`) or a named dataset, through `prepare_splits`;
    `max_train_samples` and `max_eval_samples` keep a fixed random subset (drawn with `seed`) of a split."""
    if train_dir is not None or validation_dir is not None:
        if dataset_name is not None:
            raise DataError("give either --dataset_name or --train_dir/--validation_dir, not both.")
        dataset = load_image_folders(train_dir, validation_dir, cache_dir)
    elif dataset_name in (None, "digits"):
        dataset = load_digits_dataset()
    else:
        dataset = load_named_dataset(dataset_name, dataset_config_name, cache_dir, token)
    dataset = prepare_splits(dataset, image_column, label_column, train_val_split, seed)
    for split, limit in (("train", max_train_samples), ("validation", max_eval_samples)):
        if split in dataset and limit is not None and limit < len(dataset[split]):
            dataset[split] = dataset[split].shuffle(seed=seed).select(range(limit))
    return dataset


def digits_tensors(image_size: int, mean=IMAGENET_STANDARD_MEAN, std=IMAGENET_STANDARD_STD):
    """The digits split through the evaluation transform (by default normalised as `ViTImageProcessor()` does), as
    tensors: `((train pixel_values, train labels), (validation pixel_values, validation labels))`."""
    dataset = load_digits_dataset()
    _, transform = build_transforms(image_size, augment=False, mean=list(mean), std=list(std))

    def tensors(split):
        pixel_values = torch.stack([transform(load_rgb_image(image)) for image in split["image"]])
        return pixel_values, torch.tensor(split["label"], dtype=torch.long)

    return tensors(dataset["train"]), tensors(dataset["validation"])
