"""The one loader (`conformer_vit.sources.load_model`): every way a source can be broken is one `ValueError` or
`OSError` naming it, and each command-line tool prints it as its one `error:` line."""

import json
import shutil

import pytest
import torch

import convert_npz_to_hf as converter
import run_image_classification as training
import visualize_attention as pictures
from configuration_conformer import ConformerConfig
from conformer_vit.sources import load_model
from modeling_conformer import ConformerForImageClassification

TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=16)


class Planted:
    """An object whose unpickling would run code: `weights_only=True` must refuse it."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


BROKEN = {
    "truncated weights": lambda folder: (folder / "model.safetensors").write_bytes(
        (folder / "model.safetensors").read_bytes()[:-50]
    ),
    "weights of another width": lambda folder: edit_config(folder, hidden_size=64),
    "unknown activation": lambda folder: edit_config(folder, hidden_act="swoosh"),
    "image smaller than a patch": lambda folder: edit_config(folder, image_size=4),
    "negative num_labels": lambda folder: edit_config(folder, id2label={}, num_labels=-1),
    "planted pickle": lambda folder: (
        (folder / "model.safetensors").unlink(),
        torch.save({"weights": Planted()}, folder / "pytorch_model.bin"),
    ),
    "foreign weights": lambda folder: (
        (folder / "model.safetensors").unlink(),
        torch.save({"other.weight": torch.zeros(2)}, folder / "pytorch_model.bin"),
    ),
    "no config": lambda folder: (folder / "config.json").unlink(),
}


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good") / "model"
    ConformerForImageClassification(ConformerConfig(**TINY, patch_size=8, num_labels=3)).save_pretrained(folder)
    return folder


def broken_folder(good_folder, tmp_path, problem):
    folder = tmp_path / "broken"
    shutil.copytree(good_folder, folder)
    BROKEN[problem](folder)
    return folder


@pytest.mark.parametrize("problem", BROKEN)
def test_a_broken_folder_is_one_error_naming_it(good_folder, tmp_path, capsys, problem):
    folder = broken_folder(good_folder, tmp_path, problem)
    with pytest.raises((ValueError, OSError)) as raised:
        load_model(str(folder))
    assert "unpickled!" not in capsys.readouterr().out
    assert str(folder) in str(raised.value)


@pytest.mark.parametrize("problem", BROKEN)
@pytest.mark.parametrize("tool", ["convert", "train", "visualize"])
def test_every_tool_prints_a_broken_source_as_one_line(good_folder, tmp_path, capsys, problem, tool):
    folder = broken_folder(good_folder, tmp_path, problem)
    out = tmp_path / "out"
    if tool == "convert":
        status = converter.main(["--from_transformers", str(folder), "--output_dir", str(out)])
    elif tool == "train":
        quick = ["--max_steps", "1", "--use_cpu", "--report_to", "none", "--disable_tqdm", "True"]
        status = training.main(["--model_name_or_path", str(folder), "--output_dir", str(out), *quick])
    else:
        status = pictures.main(["--model", str(folder), "--image", "digits:0", "--output", str(tmp_path / "a.png")])
    captured = capsys.readouterr()
    assert status == 2 and "Traceback" not in captured.err and "unpickled!" not in captured.out
    assert captured.err.strip().splitlines()[-1].startswith("error: "), captured.err


@pytest.mark.parametrize("source", [123, None, 4.5])
def test_a_source_that_is_neither_a_path_nor_a_model_is_a_value_error(source):
    with pytest.raises(ValueError, match="expected a folder, a Hub id, an .npz file or a model object"):
        load_model(source)


def test_a_missing_local_folder_is_reported_as_missing_not_as_a_bad_repo_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_model(str(tmp_path / "nope"))


def test_a_typo_in_an_override_is_refused_naming_it():
    from transformers import ViTConfig, ViTModel

    source = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(ValueError, match="'merge_mod'"):
        ConformerForImageClassification.from_transformers(source, merge_mod="ward")
