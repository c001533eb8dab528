#!/usr/bin/env python
"""Fine-tune a Conformer for image classification with transformers' `Trainer`: one CPU, one GPU, or many GPUs and
machines through `accelerate launch`, in fp32, fp16 or bf16.

    python run_image_classification.py demo_args.json          # every argument from one JSON file
    python run_image_classification.py --dataset_name cifar10 --npz_path ViT-B_16.npz --ignore_mismatched_sizes \\
        --output_dir runs/cifar10 --fp16
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml run_image_classification.py ...

Data flows one way: arguments -> dataset (a Hub dataset or a `save_to_disk` folder, image folders, or scikit-learn's
bundled digits) -> transforms -> model (a Conformer or transformers ViT folder or Hub id, a Google `.npz` converted on
the fly, or a preset from scratch) -> `Trainer` -> the saved model with its remote code and image processor,
`all_results.json`, a model card and `training_curves.png`.

The defaults are the original ViT fine-tuning recipe (SGD with momentum 0.9, lr 3e-2, no weight decay, cosine schedule
with 500 warmup steps, gradient clipping at 1.0, 10000 steps of 512 images, evaluation every 100 steps); see
`ConformerTrainingArguments`. Every `TrainingArguments` flag still works and overrides them.
"""

import ast
import copy
import io
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import datasets
import numpy as np
import torch
import transformers
from datasets import ClassLabel, Dataset, DatasetDict, Features, load_dataset, load_from_disk
from PIL import Image
from torchvision.transforms import Compose, Normalize, RandomHorizontalFlip, RandomResizedCrop, Resize, ToTensor
from transformers import HfArgumentParser, Trainer, TrainingArguments, ViTImageProcessor
from transformers.image_utils import PILImageResampling
from transformers.trainer_utils import IntervalStrategy, SchedulerType, set_seed
from transformers.training_args import OptimizerNames

from configuration_conformer import CLASSIFIERS, MERGE_MODES, PRESETS, ConformerConfig
from modeling_conformer import ConformerForImageClassification, resample_position_embeddings

logger = logging.getLogger(__name__)

IMAGE_MEAN = IMAGE_STD = [0.5, 0.5, 0.5]  # the original recipe maps pixels to [-1, 1]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
IMAGE_COLUMN_NAMES = ("image", "img", "pixel_values")  # tried in order when --image_column_name is not given
LABEL_COLUMN_NAMES = ("label", "labels", "fine_label")  # CIFAR-100's fine labels before its coarse ones
EVAL_SPLIT_NAMES = ("validation", "valid", "val", "test")
HEAD_PREFIXES = ("classifier.", "cnn_head.", "pre_logits.")
POSITION_EMBEDDINGS = "conformer.embeddings.position_embeddings"


class ScriptError(Exception):
    """Bad input (arguments, data, checkpoint): `main` prints it as one `error: ...` line and exits with status 2."""


# --------------------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class DataTrainingArguments:
    """Which images to train and evaluate on."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "`digits` (scikit-learn's bundled 8x8 digits, offline), `cifar10`, `cifar100`, any Hub dataset id, "
            "or a folder written by `datasets`' `save_to_disk`. Default: `digits`, unless --train_dir is given."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The Hub dataset's configuration name."})
    train_dir: str | None = field(
        default=None, metadata={"help": "A folder of training images, one sub-folder per class (`imagefolder`)."}
    )
    validation_dir: str | None = field(
        default=None, metadata={"help": "A folder of validation images, one sub-folder per class."}
    )
    image_column_name: str | None = field(
        default=None, metadata={"help": f"The image column. Default: the first of {', '.join(IMAGE_COLUMN_NAMES)}."}
    )
    label_column_name: str | None = field(
        default=None, metadata={"help": f"The label column. Default: the first of {', '.join(LABEL_COLUMN_NAMES)}."}
    )
    train_val_split: float = field(
        default=0.15,
        metadata={"help": "Fraction of the training split held out for evaluation when the dataset has no such split."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on this many examples (a fixed random subset), for quick runs."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on this many examples (a fixed random subset), for quick runs."}
    )
    augment: bool | None = field(
        default=None,
        metadata={
            "help": "Random resized crop (scale 0.05-1) and horizontal flip for training images, as in the original "
            "recipe. Default: on, except for digits (only upsampled: a flipped digit is another glyph)."
        },
    )


@dataclass
class ModelArguments:
    """Which model to start from, and how to change its configuration."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A Conformer folder or Hub id (e.g. one written by convert_npz_to_hf.py), or a transformers ViT "
            "folder or Hub id, given token merging through `from_vit`."
        },
    )
    npz_path: str | None = field(
        default=None,
        metadata={"help": "A Google ViT `.npz` checkpoint, converted on the fly (the original's --pretrained_dir)."},
    )
    model_type: str | None = field(
        default=None,
        metadata={
            "help": f"Train from scratch with this preset: {', '.join(PRESETS)}. Default: ViT-B_16 when neither "
            "--model_name_or_path nor --npz_path is given."
        },
    )
    image_size: int | None = field(
        default=None,
        metadata={
            "help": "Training resolution. Default: the checkpoint's (224 from scratch). A checkpoint's position "
            "embeddings are resampled (bilinear, class token apart) when it differs."
        },
    )
    patch_size: int | None = field(default=None, metadata={"help": "Patch size (from scratch only)."})
    merge_mode: str | None = field(
        default=None,
        metadata={"help": f"Token merging: {', '.join(MERGE_MODES)}. Default: the checkpoint's (none from scratch)."},
    )
    merge_r: str | None = field(
        default=None, metadata={"help": "Tokens merged away per layer: one int, or one per layer (`8,8,4,...`)."}
    )
    classifier: str | None = field(
        default=None,
        metadata={"help": f"Classifier head: {', '.join(CLASSIFIERS)}. Default: the checkpoint's (token)."},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Other config fields as `key=value,...`, values as Python literals, e.g. "
            "`hidden_size=96,num_hidden_layers=4,merge_r=[4,4,2,2]`; applied after the flags above."
        },
    )
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={
            "help": "Allow a checkpoint whose head has another number of labels than the dataset: the head is "
            "replaced by a zero-initialised one (and a pre-logits layer dropped), as the ViT paper transfers."
        },
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where Hub models and datasets are cached."})
    model_revision: str = field(default="main", metadata={"help": "Hub revision (branch, tag or commit) of the model."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private models and datasets."})


def _recipe(name: str, default):
    """A `TrainingArguments` field with the recipe's default, keeping transformers' help text."""
    base_help = TrainingArguments.__dataclass_fields__[name].metadata.get("help", "")
    return field(default=default, metadata={"help": f"{base_help} Recipe default: {default}."})


@dataclass
class ConformerTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the original ViT fine-tuning recipe as defaults.

    `HfArgumentParser` takes each flag's default from the dataclass, so the recipe lives here as field defaults: a flag
    given on the command line (or in the JSON file) always wins. Two rules depend on other flags, in `__post_init__`:
    `optim_args` defaults to `momentum=0.9` only when the optimizer is SGD, and `gradient_accumulation_steps`, unless
    given, is `total_batch_size / (per_device_train_batch_size * number of processes)`.
    """

    output_dir: str | None = field(
        default=None, metadata={"help": "Required: where checkpoints, the final model, metrics and logs are written."}
    )
    do_train: bool = _recipe("do_train", True)
    do_eval: bool = _recipe("do_eval", True)
    max_steps: int = _recipe("max_steps", 10000)
    learning_rate: float = _recipe("learning_rate", 3e-2)
    lr_scheduler_type: SchedulerType | str = _recipe("lr_scheduler_type", "cosine")
    warmup_steps: float = _recipe("warmup_steps", 500)
    optim: OptimizerNames | str = _recipe("optim", "sgd")
    weight_decay: float = _recipe("weight_decay", 0.0)
    max_grad_norm: float = _recipe("max_grad_norm", 1.0)
    per_device_train_batch_size: int = _recipe("per_device_train_batch_size", 64)
    per_device_eval_batch_size: int = _recipe("per_device_eval_batch_size", 64)
    gradient_accumulation_steps: int | None = field(
        default=None,
        metadata={"help": "Micro-batches per optimizer step. Default: derived from --total_batch_size."},
    )
    eval_strategy: IntervalStrategy | str = _recipe("eval_strategy", "steps")
    eval_steps: float | None = _recipe("eval_steps", 100)
    logging_steps: float = _recipe("logging_steps", 20)
    report_to: None | str | list[str] = _recipe("report_to", "tensorboard")
    remove_unused_columns: bool = _recipe("remove_unused_columns", False)  # the transforms need the raw columns
    cpu_threads: int | None = field(
        default=None,
        metadata={
            "help": "Threads for torch's CPU operations (`torch.set_num_threads`). Default: torch's choice. On a busy "
            "or shared machine 1 can be several times faster for small models."
        },
    )
    total_batch_size: int = field(
        default=512,
        metadata={
            "help": "Images per optimizer step over all processes, reached by gradient accumulation: "
            "gradient_accumulation_steps = total_batch_size / (per_device_train_batch_size * processes). "
            "Ignored when --gradient_accumulation_steps is given."
        },
    )

    def __post_init__(self):
        if self.output_dir is None:
            raise ValueError("--output_dir is required: the folder for checkpoints, the final model and results.")
        if self.do_eval is False:  # TrainingArguments turns evaluation back on while eval_strategy is "steps"
            self.eval_strategy = "no"
        if self.optim_args is None and self.optim == "sgd":
            self.optim_args = "momentum=0.9"
        if self.gradient_accumulation_steps is None:
            processes = _launched_processes(self.use_cpu)
            micro_batch = self.per_device_train_batch_size * processes
            if self.total_batch_size < micro_batch or self.total_batch_size % micro_batch:
                raise ValueError(
                    f"--total_batch_size {self.total_batch_size} is not a multiple of per_device_train_batch_size "
                    f"{self.per_device_train_batch_size} x {processes} process(es); change one of them or give "
                    "--gradient_accumulation_steps."
                )
            self.gradient_accumulation_steps = self.total_batch_size // micro_batch
        super().__post_init__()


def _launched_processes(use_cpu: bool) -> int:
    """Processes that share one optimizer step: the launcher's WORLD_SIZE, or the GPUs `DataParallel` would use."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1 and not use_cpu and torch.cuda.is_available():
        return max(1, torch.cuda.device_count())
    return world_size


def parse_arguments(args: list[str]) -> tuple[ModelArguments, DataTrainingArguments, ConformerTrainingArguments]:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, ConformerTrainingArguments))
    try:
        if len(args) == 1 and args[0].endswith(".json"):
            return parser.parse_json_file(json_file=os.path.abspath(args[0]))
        return parser.parse_args_into_dataclasses(args=args)
    except (ValueError, OSError) as error:  # TrainingArguments and ours validate in __post_init__
        raise ScriptError(str(error).strip().splitlines()[0]) from error


def parse_merge_r(value) -> int | list[int] | None:
    """`--merge_r`: an int, a list of ints, or their text (`"8"`, `"8,8,4"`, `"[8, 8, 4]"`)."""
    if value is None or isinstance(value, (int, list)):
        return value
    text = str(value).strip().strip("[]")
    try:
        numbers = [int(part) for part in text.split(",")]
    except ValueError:
        raise ScriptError(f"--merge_r must be an int or comma-separated ints, got {value!r}.") from None
    return numbers[0] if len(numbers) == 1 else numbers


def parse_config_overrides(text: str | None) -> dict:
    """`"hidden_size=96,merge_r=[4,4,2,2],classifier=gap"` -> a dict; values are Python literals, else strings."""
    if not text:
        return {}
    items, depth, current = [], 0, ""
    for char in text:  # split on the commas that are not inside brackets
        if char in "[(":
            depth += 1
        elif char in "])":
            depth -= 1
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    items.append(current)
    overrides = {}
    known_fields = ConformerConfig().to_dict()
    for item in filter(str.strip, items):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise ScriptError(f"--config_overrides takes key=value pairs separated by commas, got {item.strip()!r}.")
        if key not in known_fields:
            raise ScriptError(f"--config_overrides: {key!r} is not a ConformerConfig field.")
        literals = {"true": True, "false": False, "none": None, "null": None}
        try:
            overrides[key] = literals[value.lower()] if value.lower() in literals else ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    return overrides


# --------------------------------------------------------------------------------------------------------------------
# Dataset: a DatasetDict with "train" and "validation" splits of {"image": undecoded Image, "label": ClassLabel}
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


def load_named_dataset(name: str, config_name: str | None, cache_dir: str | None, token: str | None) -> DatasetDict:
    """A `save_to_disk` folder, or a dataset from the Hub (`cifar10`, `cifar100`, `user/name`, ...)."""
    if os.path.isdir(name) and any(
        os.path.isfile(os.path.join(name, marker)) for marker in ("dataset_dict.json", "state.json")
    ):
        dataset = load_from_disk(name)
        return dataset if isinstance(dataset, DatasetDict) else DatasetDict(train=dataset)
    try:
        return load_dataset(name, config_name, cache_dir=cache_dir, token=token)
    except Exception as error:  # datasets raises many types (offline, not found, gated, bad config): report them all
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ScriptError(
            f"cannot load dataset {name!r}: {reason} (use `digits`, `cifar10`, `cifar100`, a Hub dataset id, a "
            "save_to_disk folder, or --train_dir/--validation_dir)"
        ) from None


def load_image_folders(train_dir: str | None, validation_dir: str | None, cache_dir: str | None) -> DatasetDict:
    """`imagefolder` datasets: labels from the sub-folder names."""
    data_files = {}
    for split, flag, folder in (
        ("train", "--train_dir", train_dir),
        ("validation", "--validation_dir", validation_dir),
    ):
        if folder is None:
            continue
        if not os.path.isdir(folder):
            raise ScriptError(f"{flag} {folder!r} is not a folder.")
        has_images = any(name.lower().endswith(IMAGE_EXTENSIONS) for _, _, names in os.walk(folder) for name in names)
        if not has_images:
            raise ScriptError(
                f"{flag} {folder!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                "put them in one sub-folder per class."
            )
        data_files[split] = os.path.join(os.path.abspath(folder), "**")
    return load_dataset("imagefolder", data_files=data_files, cache_dir=cache_dir)


def _pick_column(features: Features, given: str | None, candidates: tuple[str, ...], kind: type, flag: str) -> str:
    if given is not None:
        if given not in features:
            raise ScriptError(f"{flag} {given!r} is not a column of the dataset; its columns: {', '.join(features)}.")
        return given
    for name in candidates:
        if name in features:
            return name
    for name, feature in features.items():
        if isinstance(feature, kind):
            return name
    raise ScriptError(f"cannot tell which column to use; give {flag} (the dataset's columns: {', '.join(features)}).")


def prepare_splits(dataset: DatasetDict, data_args: DataTrainingArguments, seed: int) -> DatasetDict:
    """Pick the image and label columns, name them `image` and `label`, and make `train` and `validation` splits."""
    if "train" not in dataset and "validation" not in dataset and not any(s in dataset for s in EVAL_SPLIT_NAMES):
        raise ScriptError(f"the dataset has no train or validation split; its splits: {', '.join(dataset)}.")
    splits = {}
    if "train" in dataset:
        splits["train"] = dataset["train"]
    eval_name = next((name for name in EVAL_SPLIT_NAMES if name in dataset), None)
    if eval_name is not None:
        splits["validation"] = dataset[eval_name]
    features = next(iter(splits.values())).features
    image_column = _pick_column(
        features, data_args.image_column_name, IMAGE_COLUMN_NAMES, datasets.Image, "--image_column_name"
    )
    label_column = _pick_column(
        features, data_args.label_column_name, LABEL_COLUMN_NAMES, ClassLabel, "--label_column_name"
    )
    if not isinstance(features[image_column], datasets.Image):
        raise ScriptError(f"column {image_column!r} does not hold images; give --image_column_name.")
    dataset = DatasetDict(
        {
            split: data.select_columns([image_column, label_column]).rename_columns(
                {image_column: "image", label_column: "label"}
                if image_column != "image" or label_column != "label"
                else {}
            )
            for split, data in splits.items()
        }
    )
    dataset = _encode_labels(dataset)

    if "validation" not in dataset and "train" in dataset and data_args.train_val_split > 0:
        # Same seed in every process, so a distributed run agrees on the split.
        split = dataset["train"].train_test_split(
            test_size=data_args.train_val_split, seed=seed, stratify_by_column="label"
        )
        dataset = DatasetDict(train=split["train"], validation=split["test"])
    # Decode in our transforms instead, so that an unreadable file is reported by name.
    return dataset.cast_column("image", datasets.Image(decode=False))


def _encode_labels(dataset: DatasetDict) -> DatasetDict:
    """Make `label` a `ClassLabel` with one set of names for all splits (strings or ints sorted)."""
    feature = next(iter(dataset.values())).features["label"]
    if isinstance(feature, ClassLabel):
        return dataset
    values = sorted({value for data in dataset.values() for value in data["label"]}, key=str)
    names = [str(value) for value in values]
    index = {value: i for i, value in enumerate(values)}
    new_features = next(iter(dataset.values())).features.copy()
    new_features["label"] = ClassLabel(names=names)
    return DatasetDict(
        {
            split: data.map(lambda batch: {"label": [index[v] for v in batch["label"]]}, batched=True).cast(
                new_features
            )
            for split, data in dataset.items()
        }
    )


def load_image_dataset(data_args: DataTrainingArguments, model_args: ModelArguments, seed: int) -> DatasetDict:
    if data_args.train_dir is not None or data_args.validation_dir is not None:
        if data_args.dataset_name is not None:
            raise ScriptError("give either --dataset_name or --train_dir/--validation_dir, not both.")
        dataset = load_image_folders(data_args.train_dir, data_args.validation_dir, model_args.cache_dir)
    elif data_args.dataset_name in (None, "digits"):
        dataset = load_digits_dataset()
    else:
        dataset = load_named_dataset(
            data_args.dataset_name, data_args.dataset_config_name, model_args.cache_dir, model_args.token
        )
    return prepare_splits(dataset, data_args, seed)


# --------------------------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------------------------


def decode_image(image: dict) -> Image.Image:
    """An undecoded `datasets.Image` value (`{"path", "bytes"}`) as an RGB PIL image; grayscale, palette and RGBA
    images are converted. An unreadable file raises `ScriptError` naming it."""
    path, data = image.get("path"), image.get("bytes")
    try:
        decoded = Image.open(io.BytesIO(data) if data is not None else path)
        decoded.load()
    except (OSError, ValueError) as error:  # PIL's UnidentifiedImageError and truncated files are OSErrors
        raise ScriptError(f"cannot read image {path or '(embedded bytes)'}: {error}") from None
    if decoded.mode == "P" and "transparency" in decoded.info:
        decoded = decoded.convert("RGBA")  # PIL asks palette images with transparency to go through RGBA
    return decoded if decoded.mode == "RGB" else decoded.convert("RGB")


def build_transforms(image_size: int, augment: bool) -> tuple[Callable, Callable]:
    """The original recipe: random resized crop (scale 0.05-1) + horizontal flip for training, a plain resize for
    evaluation, pixels normalised with mean and std 0.5. Without augmentation both resize (digits: 8 px upsampled)."""
    normalize = Normalize(mean=IMAGE_MEAN, std=IMAGE_STD)
    resize = Resize((image_size, image_size))  # bilinear, as the saved image processor
    eval_transform = Compose([resize, ToTensor(), normalize])
    if not augment:
        return eval_transform, eval_transform
    train_transform = Compose(
        [RandomResizedCrop((image_size, image_size), scale=(0.05, 1.0)), RandomHorizontalFlip(), ToTensor(), normalize]
    )
    return train_transform, eval_transform


def with_transform(transform: Callable) -> Callable:
    """A `set_transform` function: a batch of {"image", "label"} -> {"pixel_values", "labels"}."""

    def apply(batch):
        return {
            "pixel_values": [transform(decode_image(image)) for image in batch["image"]],
            "labels": batch["label"],
        }

    return apply


def collate_fn(examples):
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": torch.tensor([example["labels"] for example in examples]),
    }


# --------------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------------


def load_checkpoint(model_args: ModelArguments) -> ConformerForImageClassification | None:
    """The pretrained model to start from, as it was saved (None when training from scratch)."""
    if model_args.npz_path is not None:
        if not os.path.isfile(model_args.npz_path):
            raise ScriptError(f"--npz_path {model_args.npz_path!r} is not a file.")
        from convert_npz_to_hf import convert_checkpoint  # only this code path needs the converter

        try:  # the converter resamples the position embeddings itself when the size differs
            return convert_checkpoint(model_args.npz_path, image_size=model_args.image_size)
        except ValueError as error:
            raise ScriptError(f"cannot convert {model_args.npz_path!r}: {error}") from None
    if model_args.model_name_or_path is None:
        return None

    path = model_args.model_name_or_path
    hub_kwargs = dict(cache_dir=model_args.cache_dir, revision=model_args.model_revision, token=model_args.token)
    try:
        config_dict, _ = transformers.PretrainedConfig.get_config_dict(path, **hub_kwargs)
        model_type = config_dict.get("model_type")
        # Load in float32 whatever the checkpoint's dtype: the Trainer's fp16/bf16 keep float32 master weights.
        if model_type == "conformer":
            return ConformerForImageClassification.from_pretrained(path, dtype=torch.float32, **hub_kwargs)
        if model_type == "vit":
            vit = transformers.ViTForImageClassification.from_pretrained(path, dtype=torch.float32, **hub_kwargs)
            return ConformerForImageClassification.from_vit(vit)
    except OSError as error:
        raise ScriptError(f"cannot load model {path!r}: {str(error).strip().splitlines()[0]}") from None
    raise ScriptError(f"--model_name_or_path {path!r} is a {model_type!r} model; a Conformer or a ViT is needed.")


def build_config(base: ConformerConfig | None, model_args: ModelArguments, labels: list[str]) -> ConformerConfig:
    """The training model's config: the checkpoint's (or a preset's), the dataset's labels, then the flags."""
    changes = {
        "image_size": model_args.image_size,
        "patch_size": model_args.patch_size,
        "merge_mode": model_args.merge_mode,
        "merge_r": parse_merge_r(model_args.merge_r),
        "classifier": model_args.classifier,
    }
    changes = {key: value for key, value in changes.items() if value is not None}
    changes.update(parse_config_overrides(model_args.config_overrides))
    label_fields = dict(
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    try:
        if base is None:
            return ConformerConfig.from_preset(model_args.model_type or "ViT-B_16", **label_fields, **changes)
        config = copy.deepcopy(base)
        for key, value in {**label_fields, **changes}.items():
            setattr(config, key, value)
        config.validate_conformer()
        return config
    except ValueError as error:
        raise ScriptError(str(error)) from None


def transfer_weights(
    source: ConformerForImageClassification, config: ConformerConfig, ignore_mismatched_sizes: bool
) -> ConformerForImageClassification:
    """A model with `config`, holding `source`'s weights: position embeddings resampled to the new grid, and a new
    zero-initialised head (no pre-logits layer) when the labels or the head type change, as the ViT paper transfers."""
    new_head = source.config.num_labels != config.num_labels or source.config.classifier != config.classifier
    if source.config.num_labels != config.num_labels and not ignore_mismatched_sizes:
        raise ScriptError(
            f"the checkpoint classifies {source.config.num_labels} labels and the dataset has {config.num_labels}; "
            "pass --ignore_mismatched_sizes to train a new head."
        )
    if config.patch_size != source.config.patch_size:
        raise ScriptError(
            f"--patch_size {config.patch_size} differs from the checkpoint's {source.config.patch_size}; "
            "a pretrained patch embedding cannot change its patch size."
        )
    if new_head:
        config.representation_size = None
    try:
        model = ConformerForImageClassification(config)
    except ValueError as error:  # e.g. a merge schedule that removes more tokens than the new resolution has
        raise ScriptError(str(error)) from None

    state_dict = source.state_dict()
    if new_head:
        state_dict = {key: value for key, value in state_dict.items() if not key.startswith(HEAD_PREFIXES)}
    grid = config.image_size // config.patch_size
    if state_dict[POSITION_EMBEDDINGS].shape[1] != 1 + grid * grid:
        logger.info(f"Resampling the position embeddings to a {grid}x{grid} grid (bilinear).")
        state_dict[POSITION_EMBEDDINGS] = resample_position_embeddings(
            state_dict[POSITION_EMBEDDINGS], (grid, grid), mode="bilinear"
        )
    target = model.state_dict()
    mismatched = [k for k, v in state_dict.items() if k in target and target[k].shape != v.shape]
    if mismatched:
        raise ScriptError(
            f"the checkpoint's weights do not fit the requested model ({', '.join(mismatched[:3])}"
            f"{', ...' if len(mismatched) > 3 else ''}): don't change the width or depth of a pretrained model."
        )
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    misfits = [key for key in missing + unexpected if not (new_head and key.startswith(HEAD_PREFIXES))]
    if misfits:
        raise ScriptError(f"the checkpoint's weights do not fit the model: {', '.join(misfits[:5])}")
    if new_head and isinstance(model.classifier, torch.nn.Linear):
        torch.nn.init.zeros_(model.classifier.weight)
        torch.nn.init.zeros_(model.classifier.bias)
    return model


def build_model(model_args: ModelArguments, labels: list[str]) -> ConformerForImageClassification:
    sources = [model_args.model_name_or_path, model_args.npz_path, model_args.model_type]
    if sum(source is not None for source in sources) > 1:
        raise ScriptError("give one of --model_name_or_path, --npz_path or --model_type.")
    source = load_checkpoint(model_args)
    if source is None:
        config = build_config(None, model_args, labels)
        try:
            return ConformerForImageClassification(config)
        except ValueError as error:
            raise ScriptError(str(error)) from None
    return transfer_weights(source, build_config(source.config, model_args, labels), model_args.ignore_mismatched_sizes)


# --------------------------------------------------------------------------------------------------------------------
# Metric, checkpoints, plot
# --------------------------------------------------------------------------------------------------------------------


def accuracy(predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
    """`evaluate`'s accuracy (scikit-learn's `accuracy_score`): the fraction of exact matches."""
    return {"accuracy": float(np.mean(np.asarray(predictions) == np.asarray(references)))}


def load_accuracy() -> Callable[[np.ndarray, np.ndarray], dict[str, float]]:
    """`evaluate.load("accuracy")` when the Hub can be reached; offline (`HF_HUB_OFFLINE=1`), or if the download
    fails, the same computation done here, so that training never depends on a download."""
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        try:
            import evaluate

            metric = evaluate.load("accuracy")
            return lambda predictions, references: metric.compute(predictions=predictions, references=references)
        except Exception as error:  # network, Hub and cache errors alike: fall back, the numbers are identical
            logger.warning(f"evaluate.load('accuracy') failed ({type(error).__name__}); computing accuracy locally.")
    return accuracy


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest `checkpoint-N` folder whose `trainer_state.json` (the Trainer writes it last) exists: a run killed
    while saving leaves an incomplete folder behind."""
    if not os.path.isdir(output_dir):
        return None
    steps = []
    for name in os.listdir(output_dir):
        prefix, _, step = name.partition("-")
        complete = os.path.isfile(os.path.join(output_dir, name, "trainer_state.json"))
        if prefix == "checkpoint" and step.isdigit() and complete:
            steps.append(int(step))
    return os.path.join(output_dir, f"checkpoint-{max(steps)}") if steps else None


def resolve_checkpoint(resume_from_checkpoint: str | None, output_dir: str) -> str | None:
    """`--resume_from_checkpoint PATH`, or `last`/`true` for the newest complete checkpoint in --output_dir."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint.lower() in ("last", "true"):
        checkpoint = last_complete_checkpoint(output_dir)
        if checkpoint is None:
            raise ScriptError(f"--resume_from_checkpoint {resume_from_checkpoint}: no checkpoint in {output_dir!r}.")
        return checkpoint
    if not os.path.isdir(resume_from_checkpoint):
        raise ScriptError(f"--resume_from_checkpoint {resume_from_checkpoint!r} is not a folder.")
    return resume_from_checkpoint


def plot_training_curves(log_history: list[dict], path: str):
    """Training loss and evaluation accuracy against the optimizer step, from `trainer.state.log_history`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(figure)
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    train = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]
    evals = [(entry["step"], entry["eval_accuracy"]) for entry in log_history if "eval_accuracy" in entry]
    for axes, points, title in ((loss_axes, train, "training loss"), (accuracy_axes, evals, "evaluation accuracy")):
        if points:
            steps, values = zip(*points)
            axes.plot(steps, values, marker="." if len(points) < 50 else None)
        axes.set_xlabel("step")
        axes.set_title(title)
        axes.grid(alpha=0.3)
    figure.savefig(path, dpi=100)


# --------------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------------


def train(model_args: ModelArguments, data_args: DataTrainingArguments, training_args: ConformerTrainingArguments):
    if training_args.should_log:
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.warning(
        f"Process {training_args.process_index} of {training_args.world_size}, device {training_args.device}, "
        f"mixed precision {training_args.mixed_precision}; batch per optimizer step "
        f"{training_args.train_batch_size * training_args.world_size * training_args.gradient_accumulation_steps} "
        f"({training_args.gradient_accumulation_steps} accumulation step(s))."
    )
    checkpoint = resolve_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)

    with training_args.main_process_first(desc="loading the dataset"):
        dataset = load_image_dataset(data_args, model_args, training_args.seed)
    if training_args.do_train and "train" not in dataset:
        raise ScriptError("training needs a train split: give --train_dir or a dataset with one.")
    if training_args.do_eval and "validation" not in dataset:
        raise ScriptError(
            "evaluation needs a validation split: give --validation_dir or --train_val_split > 0, or --do_eval False."
        )
    labels = next(iter(dataset.values())).features["label"].names

    set_seed(training_args.seed)
    model = build_model(model_args, labels)
    image_size = model.config.image_size
    uses_folders = data_args.train_dir is not None or data_args.validation_dir is not None
    uses_digits = data_args.dataset_name in (None, "digits") and not uses_folders
    augment = data_args.augment if data_args.augment is not None else not uses_digits
    train_transform, eval_transform = build_transforms(image_size, augment)
    for split, limit, transform in (
        ("train", data_args.max_train_samples, train_transform),
        ("validation", data_args.max_eval_samples, eval_transform),
    ):
        if split not in dataset:
            continue
        if limit is not None and limit < len(dataset[split]):
            dataset[split] = dataset[split].shuffle(seed=training_args.seed).select(range(limit))
        dataset[split].set_transform(with_transform(transform))

    # Saved with the model, so that the output folder works with `pipeline("image-classification", ...)`.
    image_processor = ViTImageProcessor(
        size={"height": image_size, "width": image_size},
        resample=PILImageResampling.BILINEAR,
        image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
    )
    compute_accuracy = load_accuracy()

    def compute_metrics(prediction):
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        return compute_accuracy(np.argmax(logits, axis=-1), prediction.label_ids)

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset["train"] if training_args.do_train else None,
        eval_dataset=dataset["validation"] if training_args.do_eval else None,
        compute_metrics=compute_metrics,
        processing_class=image_processor,
        data_collator=collate_fn,
    )

    logger.info(f"Distributed mode: {trainer.accelerator.distributed_type.value}.")
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        metrics = {**train_result.metrics, "train_samples": len(dataset["train"])}
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
    if training_args.do_eval:
        metrics = {**trainer.evaluate(), "eval_samples": len(dataset["validation"])}
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    card = {
        "finetuned_from": model_args.model_name_or_path or model_args.npz_path,  # None: trained from scratch
        "tasks": "image-classification",
        "dataset": data_args.dataset_name or data_args.train_dir or "digits",
        "tags": ["image-classification", "vision", "conformer", "token-merging"],
    }
    if training_args.push_to_hub:
        trainer.push_to_hub(**card)
    else:
        trainer.create_model_card(**card)
    if training_args.do_train and trainer.is_world_process_zero():
        plot_training_curves(trainer.state.log_history, os.path.join(training_args.output_dir, "training_curves.png"))


def main(args: list[str] | None = None) -> int:
    """Run from the command line (`args`: its words, default `sys.argv[1:]`, or one `.json` file). Returns 0, or 2
    after printing one `error: ...` line for bad arguments or data."""
    threads = torch.get_num_threads()
    # A handler of our own instead of `logging.basicConfig`, removed at the end, so that main() can run in-process.
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s - %(levelname)s - %(name)s - %(message)s", "%m/%d/%Y %H:%M:%S"))
    logging.getLogger().addHandler(handler)
    try:
        model_args, data_args, training_args = parse_arguments(sys.argv[1:] if args is None else args)
        if training_args.cpu_threads is not None:
            torch.set_num_threads(training_args.cpu_threads)
        train(model_args, data_args, training_args)
    except ScriptError as error:
        # Raised in a DataLoader worker, the message carries the worker's traceback; its last line is ours.
        message = str(error).strip().splitlines()[-1]
        print(f"error: {message.split('ScriptError: ', 1)[-1]}", file=sys.stderr)
        return 2
    finally:  # when called in-process (tests), leave the caller's settings as they were
        logging.getLogger().removeHandler(handler)
        torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
