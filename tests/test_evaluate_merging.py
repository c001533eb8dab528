"""evaluate_merging.py end to end on tiny models: a Conformer folder on the bundled digits, a transformers ViT folder
on an image folder, a Hub-like dataset saved to disk; every output file, the metrics against independent references
(scikit-learn's accuracy_score, KL and top-5 by hand), the pick, the saved folder in a fresh process, and each bad
input as one `error:` line. The timing loop and the pick are also checked alone."""

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from sklearn.metrics import accuracy_score
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor, ViTModel

import evaluate_merging as tool
from configuration_conformer import ConformerConfig
from conformer_vit.data import build_transforms, load_image_dataset, load_rgb_image
from conformer_vit.sweep import SettingResult, pick_setting, time_interleaved
from modeling_conformer import ConformerForImageClassification
from token_merging import parse_merge_r

REPO = Path(__file__).resolve().parent.parent
OFFLINE_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
TINY = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16, patch_size=4
)
# Small, quick and single-threaded (the timing of several settings in turn is the slow part).
QUICK = ["--max_eval_samples", "32", "--timing_repeats", "2", "--batch_size", "16", "--device", "cpu"]
QUICK += ["--cpu_threads", "1"]
MODES = ("bipartite", "submodular", "ward")


@pytest.fixture(autouse=True)
def offline_and_threads(monkeypatch):
    """Nothing here may wait on the Hub; --cpu_threads must not leak into the other test files."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run_main(*args) -> int:
    return tool.main([str(arg) for arg in args])


def expect_error(capsys, *args) -> str:
    """Run main expecting exit status 2 and stderr ending in one `error: ...` line, without a traceback."""
    assert run_main(*args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith("error: "), err
    return last_line


# --------------------------------------------------------------------------------------------------------------------
# Models and data
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_conformer(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide Conformer for 10 classes on 16 px images (17 tokens), weights drawn wide enough (std 0.5)
    that merging visibly moves its predictions."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("models") / "tiny-conformer"
    ConformerForImageClassification(ConformerConfig(**TINY, num_labels=10, initializer_range=0.5)).save_pretrained(
        folder
    )
    return folder


def vit_config(**overrides) -> ViTConfig:
    return ViTConfig(**TINY, initializer_range=0.5, **overrides)


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory) -> Path:
    """A tiny transformers ViT with a 2-class head and its image processor, as a Hub repo would hold it."""
    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("models") / "tiny-vit"
    ViTForImageClassification(vit_config(num_labels=2)).save_pretrained(folder)
    ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(
        folder
    )
    return folder


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Two classes of four random PNGs each, in one sub-folder per class."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (root / label).mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / label / f"{i}.png")
    return root


def random_images(count: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)) for _ in range(count)]


@pytest.fixture(scope="module")
def hub_like_dataset(tmp_path_factory) -> Path:
    """A `save_to_disk` DatasetDict shaped like CIFAR-10 on the Hub: train and validation, `img` and a ClassLabel."""
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    splits = {
        name: datasets.Dataset.from_dict(
            {"img": random_images(count, seed), "label": [i % 3 for i in range(count)]}, features=features
        )
        for name, count, seed in (("train", 12, 0), ("validation", 9, 1))
    }
    folder = tmp_path_factory.mktemp("data") / "hub-like"
    datasets.DatasetDict(splits).save_to_disk(folder)
    return folder


# --------------------------------------------------------------------------------------------------------------------
# A Conformer on the digits: every setting, every output, the pick and the saved folder
# --------------------------------------------------------------------------------------------------------------------

MAX_DROP = 3.0


@pytest.fixture(scope="module")
def digits_run(tiny_conformer, tmp_path_factory):
    """One run of every mode at the default r values, picking within MAX_DROP points and saving the pick."""
    root = tmp_path_factory.mktemp("digits-run")
    output_dir, save_folder = root / "results", root / "tiny-merged"
    args = ["--model_name_or_path", tiny_conformer, "--dataset_name", "digits", "--output_dir", output_dir, *QUICK]
    args += ["--pick", f"max_drop={MAX_DROP}", "--save_folder", save_folder]
    start = time.perf_counter()
    assert run_main(*args) == 0
    print(f"digits run: {time.perf_counter() - start:.1f} s")
    report = json.loads((output_dir / "merging.json").read_text())
    return {"output_dir": output_dir, "save_folder": save_folder, "report": report, "args": args}


def test_settings_are_the_unmerged_model_and_every_mode_at_the_default_r(digits_run):
    rows = digits_run["report"]["settings"]
    # 17 tokens, 2 layers: bipartite can merge 5 in both (8 of 17, then 5 of 12), so r = 5 // 4, 5 // 2, 5.
    assert [(row["merge_mode"], row["merge_r"]) for row in rows] == [("none", 0)] + [
        (mode, r) for mode in MODES for r in (1, 2, 5)
    ]
    assert all(row["tokens_left"] == 17 - sum(row["schedule"]) for row in rows)


def test_every_output_file_holds_the_same_rows(digits_run):
    output_dir, rows = digits_run["output_dir"], digits_run["report"]["settings"]
    with open(output_dir / "merging.csv", newline="") as handle:
        csv_rows = list(csv.DictReader(handle))
    assert len(csv_rows) == len(rows)
    for csv_row, row in zip(csv_rows, rows):
        assert csv_row.keys() == row.keys()
        for key, value in row.items():
            if isinstance(value, bool):
                assert csv_row[key] == str(value)
            elif isinstance(value, float):
                assert float(csv_row[key]) == value, key
            elif key in ("merge_r", "schedule"):
                assert parse_merge_r(csv_row[key]) == (
                    value if not isinstance(value, list) or len(value) > 1 else value[0]
                )
            elif value is None:
                assert csv_row[key] == ""
            else:
                assert csv_row[key] == str(value), key

    table = [line for line in (output_dir / "merging.md").read_text().splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(rows)  # the header, then one row per setting
    assert [line.split("|")[1].strip() for line in table[1:]] == [row["setting"] for row in rows]

    png = (output_dir / "merging.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_metrics_match_scikit_learn_and_hand_computed_references(digits_run, tiny_conformer):
    split = load_image_dataset("digits", max_eval_samples=32, seed=42)["validation"]
    _, transform = build_transforms(16, augment=False, mean=[0.5] * 3, std=[0.5] * 3)  # the folder's default processor
    pixel_values = torch.stack([transform(load_rgb_image(image)) for image in split["image"]])
    labels = np.array(split["label"])
    rows = digits_run["report"]["settings"]
    probabilities = {}
    for row in rows:
        model = ConformerForImageClassification.from_pretrained(
            tiny_conformer, merge_mode=row["merge_mode"], merge_r=row["merge_r"]
        ).eval()
        with torch.no_grad():
            outputs = model(pixel_values, output_merge_info=True)
        probabilities[row["setting"]] = outputs.logits.double().softmax(-1)
        predictions = outputs.logits.argmax(-1).numpy()
        assert row["accuracy"] == pytest.approx(accuracy_score(labels, predictions), abs=1e-12)
        top5 = np.argsort(-outputs.logits.numpy(), axis=-1)[:, :5]
        assert row["top5_accuracy"] == pytest.approx(np.mean([label in top for label, top in zip(labels, top5)]))
        assert row["tokens_left"] == outputs.token_sizes.shape[1]
    reference = probabilities["unmerged"]
    for row in rows:
        p, q = reference, probabilities[row["setting"]]
        kl = (p * (p.log() - q.log())).sum(-1).mean().item()
        assert row["kl_divergence"] == pytest.approx(kl, rel=1e-4, abs=1e-9)
    assert max(row["kl_divergence"] for row in rows) > 1e-4  # merging did move the predictions


def test_flop_ratio_follows_the_documented_formula(digits_run):
    def macs(schedule, tokens=17, hidden=32, mlp=64):
        total = 0
        for r in schedule:  # projections, attention, MLP after the merge
            total += 4 * tokens * hidden * hidden + 2 * tokens * tokens * hidden + 2 * (tokens - r) * hidden * mlp
            tokens -= r
        return total

    for row in digits_run["report"]["settings"]:
        assert row["flop_ratio"] == pytest.approx(macs(row["schedule"]) / macs([0, 0]))
    # r = 5 in both layers, by hand: (69632 + 18496 + 49152) + (49152 + 9216 + 28672) over 2 · (69632 + 18496 + 69632)
    assert digits_run["report"]["settings"][3]["flop_ratio"] == pytest.approx(224320 / 315520)


def test_frontier_and_pick_agree_with_the_json(digits_run):
    report = digits_run["report"]
    rows = report["settings"]
    for row in rows:
        dominated = any(o["images_per_s"] > row["images_per_s"] and o["accuracy"] >= row["accuracy"] for o in rows)
        assert row["on_frontier"] == (not dominated)
    within_budget = [row for row in rows if 100 * (rows[0]["accuracy"] - row["accuracy"]) <= MAX_DROP]
    fastest = max(within_budget, key=lambda row: row["images_per_s"])
    assert report["pick"] == {"rule": f"max_drop={MAX_DROP:g}", "setting": fastest["setting"]}


def test_saved_folder_carries_the_pick_and_reloads_in_a_fresh_process(digits_run, tmp_path):
    folder, report = digits_run["save_folder"], digits_run["report"]
    picked = next(row for row in report["settings"] if row["setting"] == report["pick"]["setting"])
    check = (
        "import json, sys; from transformers import AutoModelForImageClassification; "
        "m = AutoModelForImageClassification.from_pretrained(sys.argv[1], trust_remote_code=True); "
        "print(json.dumps([m.config.merge_mode, m.config.merge_r, type(m).__module__]))"
    )
    env = {key: value for key, value in OFFLINE_ENV.items() if key != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", check, str(folder)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    merge_mode, merge_r, module = json.loads(done.stdout.strip().splitlines()[-1])
    assert (merge_mode, merge_r) == (picked["merge_mode"], picked["merge_r"])
    assert module.startswith("transformers_modules")  # the folder's own remote code built it

    card = ModelCard.load(folder / "README.md")
    results = card.data.eval_results
    assert [result.metric_value for result in results] == [row["accuracy"] for row in report["settings"]]
    assert all(row["setting"] in result.metric_name for result, row in zip(results, report["settings"]))
    assert {(result.dataset_type, result.dataset_split) for result in results} == {("digits", "validation")}
    assert f"**{picked['setting']}**" in card.text and "| unmerged |" in card.text


def test_earlier_results_and_saved_folders_are_replaced_only_with_overwrite(digits_run, capsys, tmp_path):
    def run_again_with(**paths):  # the digits run's arguments, with some paths replaced by new ones
        args = list(digits_run["args"])
        for flag, path in paths.items():
            args[args.index(f"--{flag}") + 1] = path
        return args

    line = expect_error(capsys, *run_again_with(save_folder=tmp_path / "saved"))
    assert "--output_dir" in line and "--overwrite" in line
    line = expect_error(capsys, *run_again_with(output_dir=tmp_path / "results"))
    assert "--save_folder" in line and "--overwrite" in line
    assert not (tmp_path / "saved").exists() and not (tmp_path / "results").exists()


# --------------------------------------------------------------------------------------------------------------------
# Other sources and data: a transformers ViT on an image folder, a Hub-like dataset on disk
# --------------------------------------------------------------------------------------------------------------------


def test_a_vit_family_folder_on_an_image_folder(vit_folder, image_folder, tmp_path):
    output_dir = tmp_path / "results"
    args = ["--model_name_or_path", vit_folder, "--validation_dir", image_folder, "--output_dir", output_dir, *QUICK]
    assert run_main(*args, "--merge_modes", "bipartite", "ward", "--merge_r", "2", "1,3", "--pick", "speedup=1") == 0
    report = json.loads((output_dir / "merging.json").read_text())
    rows = report["settings"]
    assert [row["setting"] for row in rows] == [
        "unmerged",
        "bipartite r=2",
        "bipartite r=1,3",
        "ward r=2",
        "ward r=1,3",
    ]
    assert rows[2]["schedule"] == [1, 3] and rows[2]["tokens_left"] == 13
    assert all(row["top5_accuracy"] is None for row in rows)  # 2 classes

    # The unmerged Conformer is the ViT itself: its accuracy is the ViT's own, labels by position (cat 0, dog 1).
    split = load_image_dataset(validation_dir=str(image_folder))["validation"]
    _, transform = build_transforms(16, augment=False, mean=[0.5] * 3, std=[0.5] * 3)
    pixel_values = torch.stack([transform(load_rgb_image(image)) for image in split["image"]])
    with torch.no_grad():
        predictions = ViTForImageClassification.from_pretrained(vit_folder).eval()(pixel_values).logits.argmax(-1)
    assert report["images"] == len(split) == 8
    assert rows[0]["accuracy"] == pytest.approx(accuracy_score(split["label"], predictions.numpy()), abs=1e-12)

    at_least_as_fast = [row for row in rows if row["speedup"] >= 1]
    best = max(at_least_as_fast, key=lambda row: (row["accuracy"], row["images_per_s"]))
    assert report["pick"]["setting"] == best["setting"]


def test_a_hub_like_dataset_saved_to_disk(tiny_conformer, hub_like_dataset, tmp_path, capsys):
    common = ["--model_name_or_path", tiny_conformer, "--dataset_name", hub_like_dataset, "--image_column_name", "img"]
    common += [*QUICK, "--merge_modes", "bipartite", "--merge_r", "1"]
    assert run_main(*common, "--output_dir", tmp_path / "validation") == 0
    report = json.loads((tmp_path / "validation" / "merging.json").read_text())
    assert (report["split"], report["images"], report["classes"]) == ("validation", 9, 3)

    # A speed-up no setting reaches: the results are still written, the status is 1 and nothing is saved.
    train_args = [*common, "--eval_split", "train", "--output_dir", tmp_path / "train", "--pick", "speedup=1000"]
    assert run_main(*train_args, "--save_folder", tmp_path / "saved") == 1
    assert "error: --pick speedup=1000: no setting is that fast" in capsys.readouterr().err
    report = json.loads((tmp_path / "train" / "merging.json").read_text())
    assert (report["split"], report["images"]) == ("train", 12)
    assert report["pick"] == {"rule": "speedup=1000", "setting": None} and not (tmp_path / "saved").exists()


# --------------------------------------------------------------------------------------------------------------------
# Bad input: one line, status 2, nothing written
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def headless_vit(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models") / "vit-no-head"
    ViTModel(vit_config(), add_pooling_layer=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def empty_dataset(tmp_path_factory) -> Path:
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    folder = tmp_path_factory.mktemp("data") / "empty"
    one_image = datasets.Dataset.from_dict({"image": random_images(1, 0), "label": [0]}, features=features)
    # from_dict cannot build zero rows, and datasets cannot load a saved `select([])`: a filter empties it
    datasets.DatasetDict(validation=one_image.filter(lambda example: False)).save_to_disk(folder)
    return folder


BAD_INPUTS = {  # name: (model, extra arguments, words the error line must hold)
    "unknown column": ("tiny", ["--label_column_name", "nope"], ["--label_column_name 'nope'", "image, label"]),
    "missing split": ("tiny", ["--dataset_name", "HUB", "--eval_split", "test"], ["'test'", "train, validation"]),
    "more classes than the head": ("vit", [], ["10 classes", "predicts 2"]),
    "no classifier": ("headless", [], ["no classifier"]),
    "r too large": ("tiny", ["--merge_modes", "bipartite", "--merge_r", "9"], ["9 tokens", "at most 8"]),
    "list of the wrong length": ("tiny", ["--merge_r", "1,1,1"], ["3 values", "2 layers"]),
    "empty dataset": ("tiny", ["--dataset_name", "EMPTY"], ["no images"]),
    "unknown merge mode": ("tiny", ["--merge_modes", "bipartite", "tome"], ["'tome'", "bipartite"]),
    "pick without a value": ("tiny", ["--pick", "max_drop"], ["--pick 'max_drop'"]),
    "pick of another rule": ("tiny", ["--pick", "fastest=1"], ["--pick 'fastest=1'"]),
    "pick of no speed": ("tiny", ["--pick", "speedup=0"], ["--pick 'speedup=0'"]),
    "save without pick": ("tiny", ["--save_folder", "SAVE"], ["--pick"]),
    "output inside the model": ("tiny", ["--output_dir", "MODEL/results"], ["inside the input folder"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_error_line(
    case, capsys, tmp_path, tiny_conformer, vit_folder, headless_vit, hub_like_dataset, empty_dataset
):
    model_key, extra, expected = BAD_INPUTS[case]
    model = {"tiny": tiny_conformer, "vit": vit_folder, "headless": headless_vit}[model_key]
    places = {"HUB": hub_like_dataset, "EMPTY": empty_dataset, "SAVE": tmp_path / "saved", "MODEL": model}
    extra = [
        str(places.get(word.split("/")[0], word.split("/")[0])) + word[len(word.split("/")[0]) :] for word in extra
    ]
    output_dir = tmp_path / "results"
    args = ["--model_name_or_path", model, "--output_dir", output_dir, *QUICK, *extra]
    line = expect_error(capsys, *args)
    assert all(word in line for word in expected), line
    assert not output_dir.exists() and not (tmp_path / "saved").exists()


# --------------------------------------------------------------------------------------------------------------------
# The sweep's parts alone
# --------------------------------------------------------------------------------------------------------------------


def test_timing_warms_up_every_model_first_then_times_each_once_per_round():
    calls = []

    def model(name, seconds):
        def forward(inputs):
            calls.append(name)
            time.sleep(seconds)

        return forward

    models = {"fast": model("fast", 0.002), "slow": model("slow", 0.006)}
    timings = time_interleaved(models, torch.zeros(4, 1), repeats=3, warmup=2, calls=1)
    assert calls == ["fast", "fast", "slow", "slow"] + ["fast", "slow", "slow", "fast", "fast", "slow"]
    assert [len(timing.samples) for timing in timings.values()] == [3, 3]
    assert timings["fast"].images_per_s == pytest.approx(np.median(timings["fast"].samples))
    assert 1.5 < timings["fast"].images_per_s / timings["slow"].images_per_s < 3.5  # 4 / 0.002 against 4 / 0.006


def result(setting, accuracy, images_per_s, reference_speed=100.0) -> SettingResult:
    return SettingResult(
        setting, "none" if setting == "unmerged" else "bipartite", 0, "constant", None, None, [0], 1.0, 1.0, accuracy,
        None, 0.0, images_per_s, 0.0, images_per_s / reference_speed,
    )  # fmt: skip


def test_pick_takes_the_fastest_within_the_drop_and_the_most_accurate_above_the_speedup():
    rows = [result("unmerged", 0.90, 100), result("a", 0.895, 150), result("b", 0.88, 200), result("c", 0.70, 400)]
    assert pick_setting(rows, max_drop=0.5).setting == "a"
    assert pick_setting(rows, max_drop=2.0).setting == "b"
    assert pick_setting(rows, max_drop=0.0).setting == "unmerged"
    assert pick_setting(rows, min_speedup=1.6).setting == "b"
    assert pick_setting(rows, min_speedup=3.0).setting == "c"
    assert pick_setting(rows, min_speedup=5.0) is None


def test_decreasing_and_staged_schedules_are_settings_and_a_staged_pick_reloads(tiny_conformer, tmp_path):
    """--decreasing and --merge_layers/--keep_rates add ToMe's decreasing and ATC's staged schedules; each row's
    schedule is what the config computes, and a staged pick is saved with its fields."""
    output_dir, folder = tmp_path / "results", tmp_path / "staged"
    args = ["--model_name_or_path", tiny_conformer, "--dataset_name", "digits", "--output_dir", output_dir, *QUICK]
    args += ["--merge_modes", "ward", "--merge_r", "2", "--decreasing", "--merge_layers", "0", "--keep_rates", "0.5"]
    assert run_main(*args, "--pick", "max_drop=100", "--save_folder", folder) == 0
    report = json.loads((output_dir / "merging.json").read_text())
    rows = {row["setting"]: row for row in report["settings"]}
    assert list(rows) == ["unmerged", "ward r=2", "ward r=2 decreasing", "ward layers 0 keep 0.5"]
    config = ConformerForImageClassification.from_pretrained(tiny_conformer).config
    for name, fields in (("ward r=2 decreasing", dict(merge_r=2, merge_schedule="decreasing")),
                         ("ward layers 0 keep 0.5", dict(merge_layers=[0], merge_keep_rate=0.5))):  # fmt: skip
        expected = ConformerConfig(**{**config.to_dict(), "merge_mode": "ward", **fields}).merge_r_per_layer
        assert rows[name]["schedule"] == expected
    assert rows["ward layers 0 keep 0.5"]["schedule"][0] == round(0.5 * config.num_patches)  # ATC's rate, by hand
    picked = rows[report["pick"]["setting"]]
    saved = ConformerForImageClassification.from_pretrained(folder).config
    assert (saved.merge_layers, saved.merge_keep_rate) == (picked["merge_layers"], picked["merge_keep_rate"])
    assert saved.merge_r_per_layer == picked["schedule"]
