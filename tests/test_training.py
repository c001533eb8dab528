"""run_image_classification.py end to end on tiny models: the recipe's defaults, the data sources and their errors,
the three ways to get a model, resuming a killed run and a two-process `accelerate launch` on the CPU."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import accuracy_score
from transformers import Trainer, ViTConfig, ViTForImageClassification

import run_image_classification as script
from conformer_vit import data as image_data
from conformer_vit.cards import write_training_card
from modeling_conformer import ConformerForImageClassification, resample_position_embeddings

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
OFFLINE_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}

# A 2-layer, 32-wide Conformer on 16 px images (16 patches), merging on; a handful of steps, on one CPU thread.
TINY_MODEL = [
    "--model_type", "ViT-Ti_16", "--image_size", "16", "--patch_size", "4",
    "--config_overrides", "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64",
    "--merge_mode", "submodular", "--merge_r", "2",
]  # fmt: skip
QUICK = [
    "--use_cpu", "--cpu_threads", "1", "--report_to", "none", "--disable_tqdm", "True", "--seed", "0",
    "--optim", "adamw_torch", "--learning_rate", "3e-3", "--warmup_steps", "0",
    "--per_device_train_batch_size", "16", "--total_batch_size", "16", "--per_device_eval_batch_size", "64",
    "--max_steps", "2", "--eval_strategy", "no", "--save_strategy", "no", "--max_eval_samples", "32",
]  # fmt: skip


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Whatever the caller's environment, nothing here may wait on the Hub."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)


def run_main(*args) -> int:
    return script.main([str(arg) for arg in args])


def results(output_dir) -> dict:
    return json.loads((Path(output_dir) / "all_results.json").read_text())


def expect_error(capsys, *args) -> str:
    """Run main expecting exit status 2 and stderr ending in one `error: ...` line, without a traceback."""
    assert run_main(*args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last_line = err.strip().splitlines()[-1]  # after the progress bars of `datasets`, if any
    assert last_line.startswith("error: "), err
    return last_line


def save_png(path, mode, size=(12, 10), seed=0):
    array = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 4), dtype=np.uint8)
    image = Image.fromarray(array, "RGBA")
    image = {"RGBA": image, "RGB": image.convert("RGB"), "L": image.convert("L")}.get(mode) or image.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def image_folder(root, modes=("RGB", "L", "RGBA", "P"), classes=("cat", "dog")):
    for label in classes:
        for i, mode in enumerate(modes):
            save_png(root / label / f"{mode}_{i}.png", mode, seed=i + 7 * len(label))
    return root


# --------------------------------------------------------------------------------------------------------------------
# The recipe's defaults
# --------------------------------------------------------------------------------------------------------------------


def test_defaults_are_the_original_recipe_with_an_sgd_momentum_optimizer(tmp_path):
    _, data_args, args = script.parse_arguments(["--output_dir", str(tmp_path), "--use_cpu"])
    assert (args.learning_rate, args.weight_decay, args.max_grad_norm) == (3e-2, 0.0, 1.0)
    assert (args.lr_scheduler_type, args.get_warmup_steps(args.max_steps), args.max_steps) == ("cosine", 500, 10000)
    assert args.load_best_model_at_end and args.metric_for_best_model == "accuracy" and not args.dataloader_pin_memory
    assert (args.eval_strategy, args.eval_steps) == ("steps", 100)
    # 512 images per optimizer step: 64 per micro-batch times 8 accumulation steps on one process.
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (64, 8)
    assert data_args.dataset_name is None  # digits

    model = ConformerForImageClassification(script.ConformerConfig.from_preset("ViT-Ti_16", num_hidden_layers=1))
    optimizer = Trainer(model=model, args=args, eval_dataset=[]).create_optimizer()  # what train() would step
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.defaults["momentum"] == 0.9 and optimizer.defaults["lr"] == 3e-2
    assert all(group["weight_decay"] == 0.0 for group in optimizer.param_groups)


def test_warmup_scales_with_a_short_run_and_the_best_checkpoint_needs_evaluation(tmp_path):
    _, _, args = script.parse_arguments(["--output_dir", str(tmp_path), "--use_cpu", "--max_steps", "20"])
    assert args.get_warmup_steps(args.max_steps) == 1  # 5% of 20 steps, not the recipe's 500
    _, _, args = script.parse_arguments(["--output_dir", str(tmp_path), "--use_cpu", "--do_eval", "False"])
    assert not args.load_best_model_at_end  # nothing to choose the best by
    _, _, args = script.parse_arguments(["--output_dir", str(tmp_path), "--use_cpu", "--save_steps", "150"])
    assert not args.load_best_model_at_end  # saves that fall between evaluations: TrainingArguments would refuse


def test_explicit_flags_override_the_recipe(tmp_path):
    _, _, args = script.parse_arguments(
        ["--output_dir", str(tmp_path), "--use_cpu", "--gradient_accumulation_steps", "3", "--optim", "adamw_torch"]
    )
    assert args.gradient_accumulation_steps == 3  # wins over --total_batch_size
    assert args.optim == "adamw_torch" and args.optim_args is None  # momentum=0.9 belongs to SGD only
    _, _, args = script.parse_arguments(
        ["--output_dir", str(tmp_path), "--use_cpu", "--total_batch_size", "96", "--per_device_train_batch_size", "32"]
    )
    assert args.gradient_accumulation_steps == 3


def test_total_batch_size_that_does_not_divide_is_an_error(tmp_path, capsys):
    err = expect_error(capsys, "--output_dir", tmp_path, "--use_cpu", "--total_batch_size", "100")
    assert "--total_batch_size 100" in err


def test_missing_output_dir_is_an_error(capsys):
    assert "--output_dir is required" in expect_error(capsys, "--max_steps", "1")


def test_accuracy_is_scikit_learns_without_a_download():
    rng = np.random.default_rng(0)
    predictions, references = rng.integers(0, 5, 200), rng.integers(0, 5, 200)
    assert script.accuracy(predictions, references) == {"accuracy": accuracy_score(references, predictions)}


def test_config_overrides_use_transformers_parsing_and_reject_unknown_fields(capsys, tmp_path):
    model_args = script.ModelArguments(
        model_type="ViT-Ti_16", merge_mode="ward", merge_r="1,2",
        config_overrides="hidden_size=96,num_hidden_layers=2,classifier=gap,qkv_bias=false",
    )  # fmt: skip
    config = script.build_config(None, model_args, labels=["a", "b"])
    assert (config.hidden_size, config.num_hidden_layers, config.classifier, config.qkv_bias) == (96, 2, "gap", False)
    assert (config.merge_mode, config.merge_r, config.id2label) == ("ward", [1, 2], {0: "a", 1: "b"})
    err = expect_error(capsys, "--output_dir", tmp_path, *QUICK, "--config_overrides", "hidden=96")
    assert "hidden" in err and "isn't in the original config" in err


# --------------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------------


def test_unknown_dataset_name_is_one_line(tmp_path, capsys):
    err = expect_error(capsys, "--dataset_name", "no_such_dataset_xyz", "--output_dir", tmp_path, *QUICK)
    assert "cannot load dataset 'no_such_dataset_xyz'" in err


def test_missing_label_column_names_the_columns(tmp_path, capsys):
    err = expect_error(capsys, "--label_column_name", "fine_label", "--output_dir", tmp_path, *TINY_MODEL, *QUICK)
    assert "'fine_label' is not a column" in err and "image, label" in err


def test_empty_image_folder_is_an_error(tmp_path, capsys):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("no images here")
    err = expect_error(capsys, "--train_dir", tmp_path / "train", "--output_dir", tmp_path / "out", *QUICK)
    assert "holds no images" in err


@pytest.mark.parametrize("where", ["the train folder", "inside the train folder", "a folder of the user's"])
def test_output_dir_never_writes_into_an_input_or_a_folder_no_run_wrote(tmp_path, capsys, where):
    """The data-loss case: --output_dir equal to --train_dir (or inside it, or a folder holding the user's files) is
    refused before anything is written."""
    train = image_folder(tmp_path / "train")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's notes")
    output = {"the train folder": train, "inside the train folder": train / "cat" / "run"}.get(where, tmp_path / "mine")
    before = sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*"))
    err = expect_error(capsys, "--train_dir", train, "--output_dir", output, *TINY_MODEL, *QUICK)
    assert "--output_dir" in err and ("input" in err or "did not write" in err)
    assert sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_file_is_named(tmp_path, capsys, workers):
    train = image_folder(tmp_path / "train", modes=("RGB", "L"))
    (train / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    err = expect_error(
        capsys, "--train_dir", train, "--output_dir", tmp_path / "out", "--cache_dir", tmp_path / "cache",
        *TINY_MODEL, *QUICK, "--train_val_split", "0", "--do_eval", "False", "--per_device_train_batch_size", "8",
        "--total_batch_size", "8", "--dataloader_num_workers", workers,
    )  # fmt: skip
    assert "cannot read image" in err and "broken.png" in err


def test_image_folders_of_mixed_modes_train_and_evaluate(tmp_path):
    train = image_folder(tmp_path / "train")
    validation = image_folder(tmp_path / "validation", modes=("L", "RGBA"))
    output = tmp_path / "out"
    folders = ["--train_dir", train, "--validation_dir", validation, "--cache_dir", tmp_path / "cache"]
    assert run_main(*folders, "--output_dir", output, *TINY_MODEL, *QUICK) == 0
    assert results(output)["eval_samples"] == 4 and results(output)["train_samples"] == 8
    config = json.loads((output / "config.json").read_text())
    assert config["id2label"] == {"0": "cat", "1": "dog"}


def test_hub_style_dataset_with_cifar10_features(tmp_path):
    """A stand-in for `cifar10` from the Hub: the same features (`img`, `label`) and splits (`train`, `test`)."""
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    rng = np.random.default_rng(0)

    def split(count):
        images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(count)]
        return datasets.Dataset.from_dict({"img": images, "label": [i % 10 for i in range(count)]}, features=features)

    datasets.DatasetDict(train=split(40), test=split(20)).save_to_disk(tmp_path / "cifar10")
    output = tmp_path / "out"
    assert run_main("--dataset_name", tmp_path / "cifar10", "--output_dir", output, *TINY_MODEL, *QUICK) == 0
    assert results(output)["eval_samples"] == 20  # the `test` split is the evaluation set
    assert json.loads((output / "config.json").read_text())["id2label"]["9"] == "truck"


# --------------------------------------------------------------------------------------------------------------------
# Models: from scratch, from a transformers ViT, from a Google npz
# --------------------------------------------------------------------------------------------------------------------


def test_digits_end_to_end_learns_and_saves_a_loadable_model(tmp_path, capsys):
    output = tmp_path / "run"
    model = ["--model_type", "ViT-Ti_16", "--image_size", "16", "--patch_size", "4", "--merge_mode", "submodular"]
    model += ["--config_overrides", "hidden_size=64,num_hidden_layers=4,num_attention_heads=4,intermediate_size=128"]
    args = [*model, "--merge_r", "2", *QUICK, "--max_steps", "200", "--warmup_steps", "20", "--max_eval_samples", "360"]
    args += ["--per_device_train_batch_size", "32", "--total_batch_size", "32", "--eval_strategy", "steps"]
    args += ["--eval_steps", "100", "--report_to", "tensorboard", "--logging_steps", "25"]
    assert run_main("--output_dir", output, *args) == 0
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line == (
        f"Saved the model to {output}; load it with "
        f"AutoModelForImageClassification.from_pretrained({str(output)!r}, trust_remote_code=True)"
    )

    metrics = results(output)
    assert metrics["eval_accuracy"] > 0.5  # ten classes: chance is 0.1
    assert (output / "training_curves.png").stat().st_size > 0
    assert list(output.glob("runs/*/events.out.tfevents.*"))
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "modeling_conformer.py"):
        assert (output / name).is_file(), name
    from huggingface_hub import ModelCard

    card = ModelCard.load(output / "README.md")
    assert card.data.eval_results[0].metric_value == round(metrics["eval_accuracy"], 4)
    assert card.data.datasets is None and "on `digits`" in card.text  # digits is not a Hub dataset
    processor = json.loads((output / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == processor["image_std"] == [0.5, 0.5, 0.5]
    assert processor["size"] == {"height": 16, "width": 16}

    # A fresh process, elsewhere: only the folder's own remote code can build the model, and pipeline() reads it.
    check = (
        "import sys, numpy as np; from PIL import Image; "
        "from transformers import AutoModelForImageClassification, pipeline; "
        "m = AutoModelForImageClassification.from_pretrained(sys.argv[1], trust_remote_code=True); "
        "assert m.config.merge_mode == 'submodular' and m.config.merge_r == 2, m.config; "
        "assert type(m).__module__.startswith('transformers_modules'), type(m).__module__; "
        "p = pipeline('image-classification', model=sys.argv[1], trust_remote_code=True); "
        "print(p(Image.fromarray(np.zeros((8, 8, 3), np.uint8)))[0]['label'])"
    )
    env = {key: value for key, value in OFFLINE_ENV.items() if key != "PYTHONPATH"}
    done = subprocess.run(
        [PYTHON, "-c", check, str(output)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] in [str(d) for d in range(10)]


@pytest.fixture
def vit_folder(tmp_path):
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16, patch_size=4
    )
    config.num_labels = 3
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    return tmp_path / "vit"


def test_transformers_vit_gets_merging_a_new_head_and_resampled_positions(vit_folder):
    model_args = script.ModelArguments(
        model_name_or_path=str(vit_folder), image_size=32, merge_mode="bipartite", merge_r="4",
        ignore_mismatched_sizes=True,
    )  # fmt: skip
    model, processor = script.build_model(model_args, labels=[str(d) for d in range(10)])
    vit = ViTForImageClassification.from_pretrained(vit_folder)

    assert (model.config.image_size, model.config.num_labels, model.config.merge_mode) == (32, 10, "bipartite")
    expected = resample_position_embeddings(vit.vit.embeddings.position_embeddings, (8, 8), mode="bilinear")
    torch.testing.assert_close(model.conformer.embeddings.position_embeddings, expected)
    torch.testing.assert_close(
        model.conformer.layers[1].attention.q_proj.weight, vit.vit.layers[1].attention.q_proj.weight
    )
    assert not model.classifier.weight.any() and not model.classifier.bias.any()  # the paper's zero-initialised head
    assert processor.size == {"height": 32, "width": 32}  # the image processor follows the new resolution


def test_transformers_vit_folder_trains_end_to_end(vit_folder, tmp_path, capsys):
    output = tmp_path / "out"
    common = ["--model_name_or_path", vit_folder, "--output_dir", output, *QUICK]
    assert "--ignore_mismatched_sizes" in expect_error(capsys, *common)  # 3 labels in the ViT, 10 digits
    assert run_main(*common, "--ignore_mismatched_sizes", "--merge_mode", "bipartite", "--merge_r", "2") == 0
    config = json.loads((output / "config.json").read_text())
    assert (config["model_type"], len(config["id2label"]), config["merge_mode"]) == ("conformer", 10, "bipartite")


# Tiny random members of transformers' ViT family: 32 px images of 16 patches, 2 layers of width 32 with 4 heads.
FAMILY_SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)


def save_family_model(folder, name: str):
    """A randomly initialised model of transformers' class `name`, saved to `folder`; returns the model."""
    import transformers

    config = {
        "Dinov2WithRegistersModel": lambda: transformers.Dinov2WithRegistersConfig(
            **FAMILY_SHAPE, mlp_ratio=2, num_register_tokens=2
        ),
        "SiglipVisionModel": lambda: transformers.SiglipVisionConfig(**FAMILY_SHAPE, intermediate_size=64),
        "BertModel": lambda: transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4),
    }[name]()
    torch.manual_seed(0)
    model = getattr(transformers, name)(config)
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize(
    "name, patch_embedding, prefix_tokens",
    [
        ("Dinov2WithRegistersModel", "embeddings.patch_embeddings.projection.weight", 3),  # class + 2 registers
        ("SiglipVisionModel", "embeddings.patch_embedding.weight", 0),  # no class token
    ],
)
def test_vit_family_folder_trains_a_step_with_its_own_weights(tmp_path, name, patch_embedding, prefix_tokens):
    """A headless backbone gets a new head without --ignore_mismatched_sizes; at learning rate 0 the saved Conformer
    still holds the source's weights."""
    source = save_family_model(tmp_path / name, name)
    output = tmp_path / "out"
    args = ["--model_name_or_path", tmp_path / name, "--merge_mode", "bipartite", "--merge_r", "2", *QUICK]
    assert run_main(*args, "--max_steps", "1", "--learning_rate", "0", "--output_dir", output) == 0
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == 1
    model = ConformerForImageClassification.from_pretrained(output)
    assert (model.config.num_prefix_tokens, model.config.num_labels, model.config.image_size) == (prefix_tokens, 10, 32)
    torch.testing.assert_close(
        model.conformer.embeddings.patch_embeddings.projection.weight, source.state_dict()[patch_embedding]
    )


def test_unsupported_model_folder_is_one_line_naming_the_supported_classes(tmp_path, capsys):
    save_family_model(tmp_path / "bert", "BertModel")
    err = expect_error(capsys, "--model_name_or_path", tmp_path / "bert", "--output_dir", tmp_path / "out", *QUICK)
    assert "holds a BertModel" in err and "Dinov2WithRegistersModel" in err and "SiglipVisionModel" in err


def test_npz_checkpoint_is_converted_on_the_fly(tmp_path, google_npz):
    from conformer_vit.google_npz import convert_checkpoint

    npz = google_npz(tmp_path / "ViT-tiny.npz", width=32, depth=2, heads=2, mlp=64, patch=4, grid=4, classes=5)
    output = tmp_path / "out"
    args = ["--npz_path", npz, "--image_size", "24", "--ignore_mismatched_sizes", "--merge_mode", "submodular"]
    assert run_main(*args, "--merge_r", "3", "--output_dir", output, *QUICK) == 0
    assert "eval_accuracy" in results(output)

    model, _ = script.build_model(
        script.ModelArguments(npz_path=str(npz), image_size=24, ignore_mismatched_sizes=True), labels=list("abcdefghij")
    )
    reference = convert_checkpoint(str(npz), image_size=24)
    torch.testing.assert_close(
        model.conformer.embeddings.position_embeddings, reference.conformer.embeddings.position_embeddings
    )
    torch.testing.assert_close(model.conformer.layers[0].mlp.fc1.weight, reference.conformer.layers[0].mlp.fc1.weight)
    assert model.config.num_labels == 10 and not model.classifier.weight.any()


# --------------------------------------------------------------------------------------------------------------------
# Reliability: resume after a kill, two processes
# --------------------------------------------------------------------------------------------------------------------


RESUMABLE = [*TINY_MODEL, *QUICK, "--max_steps", "6", "--save_strategy", "steps", "--save_steps", "3"]
RESUMABLE += ["--logging_steps", "1", "--per_device_train_batch_size", "4", "--total_batch_size", "4"]
RESUMABLE += ["--augment", "True", "--max_train_samples", "64"]


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
    """Six augmented steps with checkpoints at steps 3 and 6: the reference for every resumed run."""
    output = tmp_path_factory.mktemp("uninterrupted")
    assert script.main([str(arg) for arg in ["--output_dir", output, *RESUMABLE]]) == 0
    return output


def step_losses(output) -> dict[int, float]:
    history = json.loads((Path(output) / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def weights(output) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(Path(output) / "model.safetensors")


def resumed_from_step_3(uninterrupted_run, output):
    output.mkdir()
    shutil.copytree(uninterrupted_run / "checkpoint-3", output / "checkpoint-3")
    return output


def test_resumed_augmented_run_reproduces_the_uninterrupted_losses_and_weights(uninterrupted_run, tmp_path):
    output = resumed_from_step_3(uninterrupted_run, tmp_path / "resumed")
    assert run_main("--output_dir", output, *RESUMABLE, "--resume_from_checkpoint", "last") == 0
    expected = step_losses(uninterrupted_run)
    assert step_losses(output) == expected and sorted(expected) == [1, 2, 3, 4, 5, 6]
    reference = weights(uninterrupted_run)
    assert all(torch.equal(tensor, reference[key]) for key, tensor in weights(output).items())
    # train_loss averages all six steps (the Trainer's own would average steps 4-6 only)
    assert results(output)["train_loss"] == pytest.approx(results(uninterrupted_run)["train_loss"], rel=1e-12)
    assert results(output)["train_loss"] == pytest.approx(np.mean(list(expected.values())), abs=1e-4)


def test_damaged_newest_checkpoint_is_skipped_with_a_warning(uninterrupted_run, tmp_path, caplog):
    output = resumed_from_step_3(uninterrupted_run, tmp_path / "resumed")
    shutil.copytree(uninterrupted_run / "checkpoint-6", output / "checkpoint-5")
    weights_file = output / "checkpoint-5" / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:-100])  # cut short, as by a full disk
    assert run_main("--output_dir", output, *RESUMABLE, "--resume_from_checkpoint", "last") == 0
    out = caplog.text
    assert "Skipping" in out and "checkpoint-5" in out and "model.safetensors" in out
    assert step_losses(output) == step_losses(uninterrupted_run)  # resumed from checkpoint-3


def test_missing_optimizer_state_is_reported_and_training_goes_on(uninterrupted_run, tmp_path, caplog):
    output = resumed_from_step_3(uninterrupted_run, tmp_path / "resumed")
    (output / "checkpoint-3" / "optimizer.pt").unlink()
    assert run_main("--output_dir", output, *RESUMABLE, "--resume_from_checkpoint", "last") == 0
    assert "no optimizer.pt: the optimizer starts fresh" in caplog.text
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == 6


def test_resume_without_a_usable_checkpoint_is_an_error(tmp_path, capsys):
    assert "no usable checkpoint" in expect_error(
        capsys, "--output_dir", tmp_path, "--resume_from_checkpoint", "last", *TINY_MODEL, *QUICK
    )
    (tmp_path / "checkpoint-4").mkdir()  # killed before trainer_state.json was written
    err = expect_error(capsys, "--output_dir", tmp_path, "--resume_from_checkpoint", tmp_path / "checkpoint-4", *QUICK)
    assert "cannot resume from" in err and "trainer_state.json" in err


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_launch(tmp_path, launcher: list[str], script: Path, args: list) -> subprocess.CompletedProcess:
    """`accelerate launch` of two processes on this machine's CPUs (gloo), offline, ignoring any user config."""
    command = [PYTHON, "-m", "accelerate.commands.launch", *launcher, "--num_processes", "2", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    args = [*args, "--use_cpu", "--ddp_backend", "gloo", "--max_train_samples", "64", "--max_steps", "-1"]
    args += ["--num_train_epochs", "1", "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1"]
    env = {**OFFLINE_ENV, "HF_HOME": str(tmp_path / "hf_home")}  # no stray default accelerate config
    done = subprocess.run(
        [*command, str(script), *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True, timeout=420
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_two_cpu_processes_with_accelerate_launch(tmp_path):
    """Each process sees half of every step's examples: 64 examples, 8 per process and step, 2 processes: 4 steps
    (one process would take 8)."""
    output = tmp_path / "ddp"
    script_path = REPO / "run_image_classification.py"
    done = accelerate_launch(tmp_path, ["--multi_gpu"], script_path, ["--output_dir", output, *TINY_MODEL, *QUICK])
    assert "Process 1 of 2" in done.stdout + done.stderr and "Distributed mode: MULTI_CPU" in done.stdout
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == 4
    assert "eval_accuracy" in results(output)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without GPUs")
def test_launched_processes_that_cannot_join_are_refused(tmp_path):
    """Launched without --use_cpu on a machine without GPUs, accelerate shares no gradients ("Distributed mode: NO")
    and every process would train alone into the same folder."""
    command = [PYTHON, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    args = [arg for arg in QUICK if arg != "--use_cpu"] + ["--gradient_accumulation_steps", "1"]
    done = subprocess.run(
        [*command, str(REPO / "run_image_classification.py"), "--output_dir", str(tmp_path), *TINY_MODEL, *args],
        cwd=REPO, env={**OFFLINE_ENV, "HF_HOME": str(tmp_path / "hf_home")}, capture_output=True, text=True,
        timeout=420,
    )  # fmt: skip
    assert done.returncode != 0
    assert "error: 2 processes were launched, but accelerate found no GPU" in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "model.safetensors").exists()  # (the traceback in stderr is the launcher's report)


# Runs the training script in each process and, once the model is saved, records what the sharded model holds and
# computes on three fixed images (FSDP's forward is collective: every process runs it).
SHARD_PROBE = """
import sys, torch
from torch.distributed.tensor import DTensor
import run_image_classification as script

class ProbedTrainer(script.ConformerTrainer):
    def save_model(self, *args, **kwargs):
        super().save_model(*args, **kwargs)
        params = list(self.model.parameters())
        torch.manual_seed(0)
        pixel_values = torch.randn(3, 3, 16, 16)
        self.model.eval()
        with torch.no_grad():
            logits = self.model(pixel_values=pixel_values).logits
        self.model.train()
        torch.save({
            "pixel_values": pixel_values, "logits": logits, "numel": sum(p.numel() for p in params),
            "local_numel": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params),
            "dtensors": sum(isinstance(p, DTensor) for p in params), "parameters": len(params),
        }, f"{self.args.output_dir}/probe-{self.args.process_index}.pt")

script.ConformerTrainer = ProbedTrainer
sys.exit(script.main())
"""


@pytest.mark.slow
def test_fsdp_config_shards_on_two_cpu_processes_and_saves_a_full_checkpoint(tmp_path):
    """accelerate_configs/fsdp.yaml (FSDP2, one shard unit per layer) on two CPU processes: every parameter is a
    DTensor of which each process holds about half, and the saved full state dict reloads into one process with the
    logits the sharded model computed."""
    output = tmp_path / "fsdp"
    probe = tmp_path / "probe.py"
    probe.write_text(SHARD_PROBE)
    launcher = ["--config_file", REPO / "accelerate_configs" / "fsdp.yaml"]
    done = accelerate_launch(tmp_path, launcher, probe, ["--output_dir", output, *TINY_MODEL, *QUICK])
    assert "Distributed mode: FSDP" in done.stdout
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == 4  # each process half a step

    shards = [torch.load(output / f"probe-{rank}.pt", weights_only=True) for rank in (0, 1)]
    for shard in shards:
        assert shard["dtensors"] == shard["parameters"] == 40
        assert 0.4 * shard["numel"] < shard["local_numel"] < 0.6 * shard["numel"]  # 10101 and 9525 of 19626
    assert sum(shard["local_numel"] for shard in shards) == shards[0]["numel"]
    torch.testing.assert_close(shards[0]["logits"], shards[1]["logits"], rtol=0, atol=0)

    model = ConformerForImageClassification.from_pretrained(output).eval()
    assert sum(p.numel() for p in model.parameters()) == shards[0]["numel"]
    with torch.no_grad():
        logits = model(pixel_values=shards[0]["pixel_values"]).logits
    torch.testing.assert_close(logits, shards[0]["logits"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits[0], logits[1], atol=1e-3)  # the logits tell the images apart


@pytest.mark.parametrize("name", sorted(path.name for path in (REPO / "accelerate_configs").glob("*.yaml")))
def test_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "accelerate_configs" / name))
    assert config.compute_environment.value == "LOCAL_MACHINE"
    if config.deepspeed_config:
        ds_file = REPO / config.deepspeed_config["deepspeed_config_file"]
        assert json.loads(ds_file.read_text())["zero_allow_untested_optimizer"] is True  # SGD under ZeRO


# --------------------------------------------------------------------------------------------------------------------
# Classifier heads
# --------------------------------------------------------------------------------------------------------------------


def test_cnn_head_with_merging_on_learns_digits(tmp_path):
    """`--classifier cnn` lays the final tokens back on the patch grid through the source map (a merged token covers
    several patches) and reads them with convolutions; with merging on, the whole model must still learn."""
    output = tmp_path / "cnn"
    args = [*TINY_MODEL, "--classifier", "cnn", *QUICK, "--max_steps", "100", "--max_eval_samples", "360"]
    args += ["--per_device_train_batch_size", "32", "--total_batch_size", "32"]
    assert run_main("--output_dir", output, *args) == 0
    config = json.loads((output / "config.json").read_text())
    assert (config["classifier"], config["merge_mode"], config["merge_r"]) == ("cnn", "submodular", 2)
    assert results(output)["eval_accuracy"] > 0.8  # chance is 0.1; measured 0.96 (0.95-0.98 over seeds 0-4)


# --------------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, before training
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--learning_rate", "-0.1"], "--learning_rate must be a number >= 0, got -0.1"),
        (["--learning_rate", "nan"], "--learning_rate must be a number >= 0, got nan"),
        (["--max_steps", "0"], "--max_steps 0 trains nothing"),
    ],
)
def test_bad_training_flags_are_one_line(tmp_path, capsys, flags, message):
    assert message in expect_error(capsys, "--output_dir", tmp_path, *TINY_MODEL, *QUICK, *flags)


@pytest.mark.parametrize("where", ["file", "under a file", "read-only"])
def test_unwritable_output_dir_is_refused_before_training(tmp_path, capsys, where):
    (tmp_path / "notes.txt").write_text("the user's file")
    output = {"file": tmp_path / "notes.txt", "under a file": tmp_path / "notes.txt" / "run"}
    output["read-only"] = "/proc/conformer-run"  # procfs refuses new folders, root's included
    if where == "read-only" and not os.path.isdir("/proc"):
        pytest.skip("needs a read-only folder such as Linux's /proc")
    err = expect_error(capsys, "--output_dir", output[where], *TINY_MODEL, *QUICK)
    expected = {"file": "is not a folder", "under a file": "which is a file", "read-only": "cannot be written"}
    assert expected[where] in err
    assert (tmp_path / "notes.txt").read_text() == "the user's file"


def test_single_class_is_refused(tmp_path, capsys):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat"])})
    images = [Image.new("RGB", (4, 4), (i, i, i)) for i in range(8)]
    datasets.Dataset.from_dict({"image": images, "label": [0] * 8}, features=features).save_to_disk(tmp_path / "data")
    err = expect_error(capsys, "--dataset_name", tmp_path / "data", "--output_dir", tmp_path / "out", *QUICK)
    assert "1 class(es) (cat); classification needs two or more" in err


def test_none_label_is_refused(tmp_path, capsys):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    images = [Image.new("RGB", (4, 4), (i, i, i)) for i in range(8)]
    data = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 0, None, 1, 0, 1, 0]}, features=features)
    datasets.DatasetDict(train=data).save_to_disk(tmp_path / "data")
    err = expect_error(capsys, "--dataset_name", tmp_path / "data", "--output_dir", tmp_path / "out", *QUICK)
    assert "1 example(s) of the train split have no label" in err


def test_decompression_bomb_in_an_image_folder_is_one_line(tmp_path, capsys):
    from test_data import png_header_only

    train = image_folder(tmp_path / "train", modes=("RGB",))
    (train / "dog" / "bomb.png").write_bytes(png_header_only(100_000, 100_000))
    err = expect_error(
        capsys, "--train_dir", train, "--output_dir", tmp_path / "out", "--cache_dir", tmp_path / "cache",
        *TINY_MODEL, *QUICK, "--train_val_split", "0", "--do_eval", "False", "--per_device_train_batch_size", "3",
        "--total_batch_size", "3",
    )  # fmt: skip
    assert "bomb.png is too large to decode" in err


def test_sixteen_bit_images_train_as_their_levels(tmp_path):
    """A 16-bit PNG reaches the model scaled to 8 bits, not clipped to white (the model sees the transformed batch)."""
    train = tmp_path / "train"
    for label, level in (("dark", 8000), ("light", 50000)):
        for i in range(2):
            (train / label).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8), level + i, np.uint16)).save(train / label / f"{i}.png")
    model_args = script.ModelArguments(model_type="ViT-Ti_16", image_size=16, patch_size=4)
    _, processor = script.build_model(model_args, labels=["dark", "light"])
    dataset = image_data.load_image_dataset(train_dir=str(train), train_val_split=0, cache_dir=str(tmp_path / "c"))
    _, transform = image_data.build_transforms(16, False, processor.image_mean, processor.image_std)
    split = image_data.TransformedDataset(dataset["train"], transform)
    means = sorted(float(split[i]["pixel_values"].mean()) for i in range(4))
    # round(8000 / 257) = 31 -> 31/255 * 2 - 1 = -0.757; round(50000 / 257) = 195 -> 0.529
    assert means == pytest.approx([-0.7569, -0.7569, 0.5294, 0.5294], abs=1e-3)


# --------------------------------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------------------------------


def test_model_card_names_base_model_and_dataset_with_a_valid_model_index(tmp_path):
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    _, _, args = script.parse_arguments(["--output_dir", str(tmp_path / "vit-cifar10"), "--use_cpu"])
    (tmp_path / "vit-cifar10").mkdir()
    config = script.ConformerConfig.from_preset("ViT-B_16", merge_mode="bipartite", merge_r=8)
    history = [{"loss": 1.0, "step": 10}, {"eval_accuracy": 0.81234, "step": 100}]
    write_training_card(args, history, base_model="google/vit-base-patch16-224", dataset="cifar10", config=config)
    card = ModelCard.load(tmp_path / "vit-cifar10" / "README.md")
    assert card.data.base_model == "google/vit-base-patch16-224" and card.data.datasets == ["cifar10"]
    name, results = model_index_to_eval_results(card.data.to_dict()["model-index"])  # the Hub's own parser
    assert name == "vit-cifar10" and len(results) == 1
    assert (results[0].metric_type, results[0].metric_value, results[0].dataset_type) == ("accuracy", 0.8123, "cifar10")
    assert "fine-tuned from `google/vit-base-patch16-224` on `cifar10`" in card.text and "0.8123 accuracy" in card.text
    assert "[](https://huggingface.co/)" not in card.content
    assert "`sgd` at learning rate 0.03 (cosine schedule, 500 warmup steps)" in card.text  # plain names, steps
    assert "Names." not in card.text and "Type." not in card.text
    assert card.data.license is None  # the base model's license is not known offline: none is claimed
    assert f"model={str(tmp_path / 'vit-cifar10')!r}" in card.text  # the folder until it is pushed

    # A local folder is not a Hub id: named in the text, not claimed as `base_model`; its card's license is kept
    write_training_card(args, [], base_model=str(tmp_path), dataset="digits", config=config, base_license="mit")
    card = ModelCard.load(tmp_path / "vit-cifar10" / "README.md")
    assert card.data.base_model is None and "model-index" not in card.data.to_dict() and str(tmp_path) in card.text
    assert card.data.license == "mit"
    write_training_card(args, [], base_model=None, dataset="digits", config=config)  # from scratch: the project's
    assert ModelCard.load(tmp_path / "vit-cifar10" / "README.md").data.license == "apache-2.0"

    args.push_to_hub, args.hub_model_id = True, "user/vit-cifar10"  # once pushed, the snippet names the Hub id
    write_training_card(args, [], base_model=None, dataset="digits", config=config)
    assert "model='user/vit-cifar10'" in ModelCard.load(tmp_path / "vit-cifar10" / "README.md").text


@pytest.mark.slow
def test_trained_cards_snippet_runs_as_written_against_the_folder(tmp_path):
    from test_convert import card_snippet, run_snippet

    output = tmp_path / "run"
    assert run_main("--output_dir", output, *TINY_MODEL, *QUICK) == 0
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    done = run_snippet(card_snippet(output / "README.md"), workdir)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "'label':" in done.stdout


def test_a_one_channel_model_is_refused_before_training(tmp_path, capsys):
    overrides = ["--config_overrides", "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,num_channels=1"]
    err = expect_error(capsys, "--output_dir", tmp_path / "out", *TINY_MODEL, *QUICK, *overrides)
    assert "1-channel" in err and not (tmp_path / "out" / "model.safetensors").exists()


def test_resuming_a_checkpoint_of_another_width_is_one_line(uninterrupted_run, tmp_path, capsys):
    output = resumed_from_step_3(uninterrupted_run, tmp_path / "resumed")
    wider = [arg.replace("hidden_size=32", "hidden_size=64") for arg in RESUMABLE]
    err = expect_error(capsys, "--output_dir", output, *wider, "--resume_from_checkpoint", "last")
    assert "cannot resume from" in err and "do not fit the model" in err


class Planted:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_a_planted_pickle_in_a_checkpoint_is_one_line_and_never_runs(uninterrupted_run, tmp_path, capsys):
    output = resumed_from_step_3(uninterrupted_run, tmp_path / "resumed")
    torch.save({"state": Planted()}, output / "checkpoint-3" / "optimizer.pt")
    err = expect_error(capsys, "--output_dir", output, *RESUMABLE, "--resume_from_checkpoint", "last")
    assert "cannot resume from" in err and "unpickled!" not in capsys.readouterr().out


@pytest.mark.slow
def test_deepspeed_zero2_config_trains_on_two_cpu_processes_and_reloads(tmp_path):
    """accelerate_configs/deepspeed_zero2.yaml as the docs give it for CPUs (--use_cpu --ddp_backend gloo)."""
    pytest.importorskip("deepspeed")
    output = tmp_path / "zero2"
    launcher = ["--config_file", REPO / "accelerate_configs" / "deepspeed_zero2.yaml"]
    done = accelerate_launch(tmp_path, launcher, REPO / "run_image_classification.py",
                             ["--output_dir", output, *TINY_MODEL, *QUICK])  # fmt: skip
    assert "Process 1 of 2" in done.stdout + done.stderr and "Distributed mode: DEEPSPEED" in done.stdout
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == 4
    reloaded = ConformerForImageClassification.from_pretrained(output)
    assert reloaded.config.merge_mode == "submodular" and "eval_accuracy" in results(output)
