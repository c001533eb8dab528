#!/usr/bin/env python
"""Fine-tune a Conformer for image classification with transformers' `Trainer`: one CPU, one GPU, or many GPUs and
machines through `accelerate launch`, in fp32, fp16 or bf16.

    python run_image_classification.py demo_args.json          # every argument from one JSON file
    python run_image_classification.py --dataset_name cifar10 --npz_path ViT-B_16.npz --ignore_mismatched_sizes \\
        --output_dir runs/cifar10 --fp16
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml run_image_classification.py ...

Data flows one way: arguments -> dataset (`image_data`: a Hub dataset or a `save_to_disk` folder, image folders, or
scikit-learn's bundled digits) -> transforms (the image processor's size, mean and std) -> model (a folder or Hub id
of a Conformer or of transformers' ViT family, a Google `.npz` converted on the fly, or a preset from scratch) ->
`Trainer` -> the saved model with its remote code and image processor, `all_results.json`, a model card and
`training_curves.png`.

The defaults are the original ViT fine-tuning recipe (SGD with momentum 0.9, lr 3e-2, no weight decay, cosine schedule
with 500 warmup steps, gradient clipping at 1.0, 10000 steps of 512 images, evaluation every 100 steps); see
`ConformerTrainingArguments`. Every `TrainingArguments` flag still works and overrides them.
"""

import copy
import json
import logging
import os
import pickle
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
import transformers
from accelerate import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, parse_flag_from_env
from safetensors import safe_open
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, IntervalStrategy, SchedulerType, sort_checkpoints
from transformers.training_args import OptimizerNames

from configuration_conformer import CLASSIFIERS, MERGE_MODES, PRESETS, ConformerConfig
from conformer_vit.cards import write_training_card
from conformer_vit.data import (
    IMAGE_COLUMN_NAMES,
    LABEL_COLUMN_NAMES,
    DataError,
    TransformedDataset,
    build_transforms,
    collate_fn,
    load_image_dataset,
)
from conformer_vit.hub_folder import default_image_processor, hub_folder_files
from conformer_vit.output_paths import OutputPathError, check_output
from conformer_vit.sources import load_image_processor, load_model, source_license, with_config
from modeling_conformer import ConformerForImageClassification
from token_merging import parse_merge_r, parse_staged

logger = logging.getLogger(__name__)

LOSS_SUM_FILE = "loss_sum.json"  # in each checkpoint: the sum of the training losses up to it
# What a run writes into --output_dir besides its checkpoints: a folder holding only these may be written again.
TRAINING_OUTPUTS = {*hub_folder_files(), "runs", "all_results.json", "train_results.json", "eval_results.json"}
TRAINING_OUTPUTS |= {"trainer_state.json", "training_args.bin", "training_curves.png"}


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

    def __post_init__(self):
        if self.augment is None:
            digits = self.dataset_name in (None, "digits") and self.train_dir is None and self.validation_dir is None
            self.augment = not digits


@dataclass
class ModelArguments:
    """Which model to start from, and how to change its configuration."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A Conformer folder or Hub id (e.g. one written by convert_npz_to_hf.py), or a folder or Hub id of "
            "transformers' ViT family (ViT, DeiT, DINOv2, CLIP and SigLIP vision, I-JEPA, ViT-MSN), given token "
            "merging through `ConformerForImageClassification.from_transformers`."
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
    merge_layers: str | None = field(
        default=None,
        metadata={"help": "ATC's staged merging instead of --merge_r: the layers that merge (0-based, `3,6,9`)."},
    )
    merge_keep_rate: str | None = field(
        default=None,
        metadata={"help": "With --merge_layers: the share of patch tokens each site keeps (one, or one per site)."},
    )
    classifier: str | None = field(
        default=None,
        metadata={"help": f"Classifier head: {', '.join(CLASSIFIERS)}. Default: the checkpoint's (token)."},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Other config fields as `key=value,...`, parsed by transformers' `PretrainedConfig."
            "update_from_string` (ints, floats, `true`/`false`, strings), e.g. `hidden_size=96,num_hidden_layers=4`; "
            "applied after the flags above."
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

    def __post_init__(self):
        if sum(source is not None for source in (self.model_name_or_path, self.npz_path, self.model_type)) > 1:
            raise ValueError("give one of --model_name_or_path, --npz_path or --model_type.")


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
    warmup_steps: float = _recipe("warmup_steps", 0.05)  # a share of the run: 500 of the recipe's 10000 steps
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
    load_best_model_at_end: bool = _recipe("load_best_model_at_end", True)  # where a run evaluates and saves alike
    metric_for_best_model: str | None = _recipe("metric_for_best_model", "accuracy")
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
        if self.output_dir is None:  # TrainingArguments would write to ./trainer_output
            raise ValueError("--output_dir is required: the folder for checkpoints, the final model and results.")
        if not self.learning_rate >= 0:  # also NaN, for which every comparison is False
            raise ValueError(f"--learning_rate must be a number >= 0, got {self.learning_rate}.")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(
                f"--max_steps {self.max_steps} trains nothing: give a positive number of steps, or -1 to train "
                "--num_train_epochs epochs."
            )
        if self.do_eval is False:  # TrainingArguments turns evaluation back on while eval_strategy is "steps"
            self.eval_strategy = "no"
        # The best checkpoint is kept only where the run evaluates each checkpoint it saves.
        steps = self.eval_strategy == "steps" and self.save_strategy == "steps"
        if (
            self.eval_strategy == "no"
            or self.save_strategy != self.eval_strategy
            or steps
            and self.save_steps % (self.eval_steps or self.logging_steps)
        ):
            self.load_best_model_at_end = False
        if not torch.cuda.is_available():  # pinning needs an accelerator; without one every DataLoader warns
            self.dataloader_pin_memory = False
        if self.optim_args is None and self.optim == "sgd":
            self.optim_args = "momentum=0.9"
        if self.gradient_accumulation_steps is None:  # before super(): a --deepspeed config reads it there
            processes = int(os.environ.get("WORLD_SIZE", "1"))  # the launcher's, or the GPUs DataParallel would use
            if processes == 1 and not self.use_cpu and torch.cuda.is_available():
                processes = max(1, torch.cuda.device_count())
            micro_batch = self.per_device_train_batch_size * processes
            if self.total_batch_size < micro_batch or self.total_batch_size % micro_batch:
                raise ValueError(
                    f"--total_batch_size {self.total_batch_size} is not a multiple of per_device_train_batch_size "
                    f"{self.per_device_train_batch_size} x {processes} process(es); change one of them or give "
                    "--gradient_accumulation_steps."
                )
            self.gradient_accumulation_steps = self.total_batch_size // micro_batch
        super().__post_init__()


def parse_arguments(args: list[str]) -> tuple[ModelArguments, DataTrainingArguments, ConformerTrainingArguments]:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, ConformerTrainingArguments))
    try:
        if len(args) == 1 and args[0].endswith(".json"):
            return parser.parse_json_file(json_file=os.path.abspath(args[0]))
        return parser.parse_args_into_dataclasses(args=args)
    except (ValueError, OSError) as error:  # the dataclasses validate in __post_init__
        raise ScriptError(str(error).strip().splitlines()[0]) from error


def is_training_output(folder) -> bool:
    """Whether `folder` holds only what a training run writes (so a new run, or a resumed one, may write there)."""
    return all(
        entry.name in TRAINING_OUTPUTS or entry.name.startswith(f"{PREFIX_CHECKPOINT_DIR}-")
        for entry in os.scandir(folder)
    )


def check_output_dir(output_dir: str, inputs: list):
    """Fail before training, not at the first save, when --output_dir must not or cannot be written: it is, holds or
    lies inside an input (an image folder, a model, a checkpoint), holds what no training run wrote, is a file, lies
    under one, or is read-only. A missing folder is created, as the Trainer would."""
    try:
        check_output(output_dir, inputs, flag="--output_dir", is_ours=is_training_output, folder=True)
    except OutputPathError as error:
        raise ScriptError(str(error)) from None
    try:
        os.makedirs(output_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):  # the one reliable test: root ignores permission bits
            pass
    except OSError as error:
        raise ScriptError(f"--output_dir {output_dir!r} cannot be written: {error.strerror or error}.") from None


# --------------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------------


def load_checkpoint(model_args: ModelArguments):
    """The pretrained model to start from as it was saved (None from scratch), through the project's one loader."""
    source = model_args.npz_path or model_args.model_name_or_path
    if source is None:
        return None
    try:  # float32 whatever the checkpoint's dtype: the Trainer's fp16/bf16 keep float32 master weights
        return load_model(source, dtype=torch.float32, hub_kwargs=hub_kwargs(model_args))
    except (OSError, ValueError, TypeError) as error:  # unreadable, or an architecture Conformer cannot represent
        raise ScriptError(f"cannot load model {source!r}: {str(error).strip().splitlines()[0]}") from None


def hub_kwargs(model_args: ModelArguments) -> dict:
    return dict(cache_dir=model_args.cache_dir, revision=model_args.model_revision, token=model_args.token)


def build_config(base: ConformerConfig | None, model_args: ModelArguments, labels: list[str]) -> ConformerConfig:
    """The training model's config: the checkpoint's (or a preset's), the dataset's labels, the flags, then
    --config_overrides. A checkpoint's head is replaced only with --ignore_mismatched_sizes, its patch size kept."""
    flags = ("image_size", "patch_size", "merge_mode", "merge_r", "classifier")  # named as the config's fields
    changes = {key: getattr(model_args, key) for key in flags if getattr(model_args, key) is not None}
    changes.update(
        num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)}
    )
    try:
        if "merge_r" in changes:
            changes["merge_r"] = parse_merge_r(changes["merge_r"])
        if (model_args.merge_layers is None) != (model_args.merge_keep_rate is None):
            raise ValueError("--merge_layers and --merge_keep_rate go together.")
        if model_args.merge_layers is not None:
            changes.update(parse_staged(model_args.merge_layers, model_args.merge_keep_rate))
        config = copy.deepcopy(base or ConformerConfig.from_preset(model_args.model_type or "ViT-B_16"))
        for key, value in changes.items():  # all set before any check: a new depth and its schedule go together
            setattr(config, key, value)
        if model_args.config_overrides:
            config.update_from_string(model_args.config_overrides)
        config.validate_architecture()
    except (ValueError, TypeError) as error:
        reason = str(error).strip().splitlines()[0]
        raise ScriptError(
            f"--config_overrides {model_args.config_overrides!r}: {reason}" if "key" in reason else reason
        ) from None
    if base is None:
        return config
    if base.num_labels not in (0, config.num_labels) and not model_args.ignore_mismatched_sizes:  # 0: no head
        raise ScriptError(
            f"the checkpoint classifies {base.num_labels} labels and the dataset has {config.num_labels}; "
            "pass --ignore_mismatched_sizes to train a new head."
        )
    if config.patch_size != base.patch_size:
        raise ScriptError(
            f"--patch_size {config.patch_size} differs from the checkpoint's {base.patch_size}; "
            "a pretrained patch embedding cannot change its patch size."
        )
    if base.num_labels != config.num_labels or base.classifier != config.classifier:
        config.representation_size = None  # a new head starts without the pre-logits layer
    return config


def build_model(model_args: ModelArguments, labels: list[str]):
    """The model to train and its image processor at the model's resolution. A checkpoint's weights go in through
    `with_config`: position embeddings resampled to the new grid, and a zero classifier when the labels or the head
    type change, as the ViT paper transfers."""
    base = load_checkpoint(model_args)
    config = build_config(None if base is None else base.config, model_args, labels)
    try:
        if base is None:
            model = ConformerForImageClassification(config)
        else:  # a backbone (a ConformerModel) becomes the base of the classifier the dataset's labels ask for
            model = with_config(base, config, ConformerForImageClassification)
    except ValueError as error:  # weights that do not fit, or a merge schedule the resolution cannot run
        raise ScriptError(str(error)) from None
    if base is None:
        return model, default_image_processor(config)
    source = model_args.npz_path or model_args.model_name_or_path
    return model, load_image_processor(source, config, hub_kwargs(model_args))


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints, metric, trainer, model card, plot
# --------------------------------------------------------------------------------------------------------------------


def checkpoint_problem(folder: str) -> str | None:
    """Why `folder` cannot be resumed from (None if it can): a missing or unreadable `trainer_state.json` (the Trainer
    writes it last, so a run killed while saving has none), weights that do not open, a truncated optimizer file."""
    try:
        with open(os.path.join(folder, "trainer_state.json")) as file:
            json.load(file)
    except (OSError, ValueError) as error:
        return f"trainer_state.json: {getattr(error, 'strerror', None) or error}"
    try:
        with safe_open(os.path.join(folder, "model.safetensors"), "pt"):
            pass
    except Exception as error:  # safetensors raises its own error type for a truncated or foreign file
        return f"model.safetensors: {str(error).strip().splitlines()[0]}"
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        path = os.path.join(folder, name)
        if os.path.exists(path) and not zipfile.is_zipfile(path):  # torch.save writes zip archives
            return f"{name} is truncated or not a torch file"
    return None


def checkpoint_mismatch(folder: str, model) -> str | None:
    """Why `folder`'s weights cannot go into `model` (None if they can): a missing, extra or other-shaped tensor."""
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as weights:
        found = {key: tuple(weights.get_slice(key).get_shape()) for key in weights.keys()}
    for key in sorted(expected.keys() | found.keys()):
        if expected.get(key) != found.get(key):
            return f"its weights do not fit the model ({key}: {found.get(key)} there, {expected.get(key)} here)"
    return None


def find_checkpoint(resume_from_checkpoint: str | None, output_dir: str) -> str | None:
    """`--resume_from_checkpoint PATH`, or `last`/`true` for the newest usable checkpoint in --output_dir; newer
    ones that cannot be used are skipped, with a warning that says why."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint.lower() not in ("last", "true"):
        if not os.path.isdir(resume_from_checkpoint):
            raise ScriptError(f"--resume_from_checkpoint {resume_from_checkpoint!r} is not a folder.")
        if problem := checkpoint_problem(resume_from_checkpoint):
            raise ScriptError(f"cannot resume from {resume_from_checkpoint!r}: {problem}.")
        return resume_from_checkpoint
    for folder in reversed(sort_checkpoints(output_dir, PREFIX_CHECKPOINT_DIR)):  # newest first
        if (problem := checkpoint_problem(folder)) is None:
            return folder
        logger.warning(f"Skipping {folder}: it is incomplete or damaged ({problem}).")
    raise ScriptError(f"--resume_from_checkpoint {resume_from_checkpoint}: no usable checkpoint in {output_dir!r}.")


def accuracy(predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
    """`evaluate`'s accuracy (scikit-learn's `accuracy_score`), computed here so that training never needs a
    download (`evaluate.load` fetches the metric's script from the Hub)."""
    return {"accuracy": float(np.mean(np.asarray(predictions) == np.asarray(references)))}


def compute_metrics(prediction) -> dict[str, float]:
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return accuracy(np.argmax(logits, axis=-1), prediction.label_ids)


def trainer_loss_sum(trainer: Trainer) -> float:
    """The sum over this run's optimizer steps of their training loss, logged or not. No public API gives it: this is
    the one place that reads the Trainer's private `_total_loss_scalar` and `_tr_loss` (tests/test_training.py's resume
    test fails if a release renames them)."""
    return trainer._total_loss_scalar + trainer._tr_loss.item()


def use_fsdp_on_cpus(trainer: Trainer):
    """accelerate keeps its FSDP plugin only on GPU-like devices and falls back to DDP on CPUs, although torch's
    `fully_shard` runs on CPUs with gloo: engage it, so that a sharded run can be tried on CPUs. The one place that
    writes accelerate's private `PartialState._shared_state` (tests/test_training.py's FSDP test fails without it)."""
    state = trainer.accelerator.state
    if state.distributed_type == DistributedType.MULTI_CPU and parse_flag_from_env("ACCELERATE_USE_FSDP"):
        state.fsdp_plugin = FullyShardedDataParallelPlugin(**(trainer.args.fsdp_plugin_args or {}))
        state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        trainer.is_fsdp_enabled = True


class LossSumCallback(TrainerCallback):
    """Writes into each checkpoint the sum of all training losses so far, so that a resumed run reports the mean loss
    of all its steps as `train_loss` (the Trainer's own counts only the steps since the resume)."""

    def __init__(self, trainer: "ConformerTrainer"):
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            with open(os.path.join(folder, LOSS_SUM_FILE), "w") as file:
                json.dump({"global_step": state.global_step, "loss_sum": self.trainer.loss_sum()}, file)


class ConformerTrainer(Trainer):
    """`Trainer` whose `train_loss` averages every step of a resumed run, and whose model card
    (`conformer_vit.cards.write_training_card`) names the base model and dataset and carries the evaluation result."""

    loss_sum_before_resume = 0.0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(LossSumCallback(self))

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        use_fsdp_on_cpus(self)

    def train(self, resume_from_checkpoint: str | None = None, **kwargs):
        """`Trainer.train`, from a checkpoint folder or None; says what a resume loses that the Trainer would not."""
        if resume_from_checkpoint is not None:
            if not os.path.exists(os.path.join(resume_from_checkpoint, "optimizer.pt")):
                logger.warning(
                    f"{resume_from_checkpoint} has no optimizer.pt: the optimizer starts fresh (momentum and Adam "
                    "moments lost)."
                )
            loss_sum_file = os.path.join(resume_from_checkpoint, LOSS_SUM_FILE)
            if os.path.exists(loss_sum_file):
                with open(loss_sum_file) as file:
                    self.loss_sum_before_resume = json.load(file)["loss_sum"]
            else:
                logger.warning(
                    f"{resume_from_checkpoint} has no {LOSS_SUM_FILE}: train_loss averages the new steps only."
                )
        result = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        result.metrics["train_loss"] = self.loss_sum() / max(self.state.global_step, 1)  # all steps, resumed or not
        return result

    def loss_sum(self) -> float:
        """The sum over all optimizer steps so far of their training loss, before and after a resume."""
        return self.loss_sum_before_resume + trainer_loss_sum(self)

    def create_model_card(self, finetuned_from: str | None = None, dataset: str = "digits", **kwargs):
        if self.is_world_process_zero():
            license_name = source_license(finetuned_from) if finetuned_from else None
            write_training_card(
                self.args, self.state.log_history, finetuned_from, dataset, self.model.config, license_name
            )


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
    inputs = [data_args.dataset_name, data_args.train_dir, data_args.validation_dir, model_args.model_name_or_path]
    resume = training_args.resume_from_checkpoint
    own_checkpoint = resume and Path(training_args.output_dir).resolve() in Path(resume).resolve().parents
    if resume and resume.lower() not in ("last", "true") and not own_checkpoint:
        inputs.append(resume)
    check_output_dir(training_args.output_dir, [*inputs, model_args.npz_path])
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and training_args.world_size != launched:  # DDP, FSDP or DeepSpeed: each would train alone
        raise ScriptError(
            f"{launched} processes were launched, but accelerate found no GPU to join them in one run; "
            "on CPUs pass --use_cpu --ddp_backend gloo."
        )
    checkpoint = find_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)

    with training_args.main_process_first(desc="loading the dataset"):
        dataset = load_image_dataset(
            dataset_name=data_args.dataset_name, dataset_config_name=data_args.dataset_config_name,
            train_dir=data_args.train_dir, validation_dir=data_args.validation_dir,
            image_column=data_args.image_column_name, label_column=data_args.label_column_name,
            train_val_split=data_args.train_val_split, max_train_samples=data_args.max_train_samples,
            max_eval_samples=data_args.max_eval_samples, seed=training_args.seed, cache_dir=model_args.cache_dir,
            token=model_args.token,
        )  # fmt: skip
    if training_args.do_train and "train" not in dataset:
        raise ScriptError("training needs a train split: give --train_dir or a dataset with one.")
    if training_args.do_eval and "validation" not in dataset:
        raise ScriptError(
            "evaluation needs a validation split: give --validation_dir or --train_val_split > 0, or --do_eval False."
        )

    set_seed(training_args.seed)
    labels = next(iter(dataset.values())).features["label"].names
    model, image_processor = build_model(model_args, labels)
    if training_args.ddp_find_unused_parameters is None:  # only a pooler the classifier never reads goes unused
        training_args.ddp_find_unused_parameters = model.config.pooler in ("dense_tanh", "attention")
    if model.config.num_channels != 3:  # every image is read as RGB
        raise ScriptError(f"the model takes {model.config.num_channels}-channel images; training reads RGB images.")
    if checkpoint is not None and (problem := checkpoint_mismatch(checkpoint, model)):
        raise ScriptError(f"cannot resume from {checkpoint!r}: {problem}.")
    size = (model.config.image_size, model.config.image_size)
    transforms = build_transforms(size, data_args.augment, image_processor.image_mean, image_processor.image_std)
    splits = {
        split: TransformedDataset(dataset[split], transform, seed=training_args.seed)
        for split, transform in zip(("train", "validation"), transforms)
        if split in dataset
    }
    trainer = ConformerTrainer(
        model=model,
        args=training_args,
        train_dataset=splits.get("train") if training_args.do_train else None,
        eval_dataset=splits.get("validation") if training_args.do_eval else None,
        compute_metrics=compute_metrics,
        processing_class=image_processor,  # saved with the model, so that `pipeline()` reads the folder
        data_collator=collate_fn,
    )

    logger.info(f"Distributed mode: {trainer.accelerator.distributed_type.value}.")
    if training_args.do_train:
        try:
            train_result = trainer.train(resume_from_checkpoint=checkpoint)
        except pickle.UnpicklingError as error:  # `weights_only=True` refused a checkpoint file's objects
            raise ScriptError(
                f"cannot resume from {checkpoint!r}: a file holds objects other than tensors, which are never unpickled"
            ) from error
        trainer.save_model()
        metrics = {**train_result.metrics, "train_samples": len(splits["train"])}
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
    if training_args.do_eval:
        metrics = {**trainer.evaluate(), "eval_samples": len(splits["validation"])}
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    card = dict(
        finetuned_from=model_args.model_name_or_path or model_args.npz_path,
        dataset=data_args.dataset_name or data_args.train_dir or "digits",
    )
    if training_args.push_to_hub:
        trainer.push_to_hub(**card)  # writes the model card first
    else:
        trainer.create_model_card(**card)
    if training_args.do_train and trainer.is_world_process_zero():
        plot_training_curves(trainer.state.log_history, os.path.join(training_args.output_dir, "training_curves.png"))
    trainer.accelerator.wait_for_everyone()  # no process may tear down the process group while another still uses it
    if training_args.do_train and trainer.is_world_process_zero():
        where = (training_args.push_to_hub and training_args.hub_model_id) or training_args.output_dir
        print(f"Saved the model to {where}; load it with "
              f"AutoModelForImageClassification.from_pretrained({where!r}, trust_remote_code=True)")  # fmt: skip


def main(args: list[str] | None = None) -> int:
    """Run from the command line (`args`: its words, default `sys.argv[1:]`, or one `.json` file). Returns 0, or 2
    after printing one `error: ...` line for bad arguments or data."""
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )  # fmt: skip
    try:
        model_args, data_args, training_args = parse_arguments(sys.argv[1:] if args is None else args)
        if training_args.cpu_threads is not None:
            torch.set_num_threads(training_args.cpu_threads)
        train(model_args, data_args, training_args)
    except (ScriptError, DataError) as error:
        # Raised in a DataLoader worker, the message carries the worker's traceback; its last line is ours.
        message = str(error).strip().splitlines()[-1]
        print(f"error: {message.split('Error: ', 1)[-1]}", file=sys.stderr)
        return 2
    finally:
        # A gloo process group left to interpreter exit can abort the process ("terminate called without an active
        # exception"): destroy it here, after every process has passed the barrier at the end of `train`.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
