"""The cluttered-digits benchmark: its generator is deterministic, keeps train and test apart (digit images and
background pixels), puts scikit-learn's digit of the label inside the image, and the script runs end to end."""

import csv
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import merge_task  # noqa: E402

IMAGE_SIZE = 64


@pytest.fixture(scope="module")
def backgrounds():
    return merge_task.load_backgrounds()


@pytest.fixture(scope="module")
def splits(backgrounds):
    return {split: merge_task.cluttered_digits(48, split, IMAGE_SIZE, 3, backgrounds) for split in ("train", "test")}


def test_same_arguments_give_the_same_images(backgrounds, splits):
    again = merge_task.cluttered_digits(48, "train", IMAGE_SIZE, 3, backgrounds)
    assert torch.equal(again["images"], splits["train"]["images"])
    assert torch.equal(again["labels"], splits["train"]["labels"])
    other_seed = merge_task.cluttered_digits(48, "train", IMAGE_SIZE, 4, backgrounds)
    assert not torch.equal(other_seed["images"], splits["train"]["images"])


def test_train_and_test_share_no_digit_image(splits):
    train_digits = {layout["digit"] for layout in splits["train"]["layouts"]}
    test_digits = {layout["digit"] for layout in splits["test"]["layouts"]}
    assert not train_digits & test_digits
    # the pools cover scikit-learn's 1797 digits exactly once, whatever the seed
    pools = np.concatenate([merge_task.digit_pool("train"), merge_task.digit_pool("test")])
    assert sorted(pools.tolist()) == list(range(1797))


def test_train_and_test_crops_share_no_background_pixel(backgrounds, splits):
    for layout in splits["train"]["layouts"]:
        width = backgrounds[layout["background"]].shape[-1]
        assert layout["crop"][1] + layout["crop"][2] <= int(width * 0.75)
    for layout in splits["test"]["layouts"]:
        height, width = backgrounds[layout["background"]].shape[1:]
        top, left, side = layout["crop"]
        assert left >= int(width * 0.75) and left + side <= width and top + side <= height


def test_the_digit_of_the_label_lies_inside_its_box(backgrounds, splits):
    digits = load_digits()
    for split in splits.values():
        for image, label, layout in zip(split["images"], split["labels"], split["layouts"]):
            top, left, side = layout["box"]
            assert 0 <= top and 0 <= left and top + side <= IMAGE_SIZE and left + side <= IMAGE_SIZE
            assert label == digits.target[layout["digit"]]
            background = merge_task.background_crop(backgrounds[layout["background"]], layout["crop"], IMAGE_SIZE)
            background = background.mul(255).round()
            change = (image.float() - background).abs().mean(0)  # [size, size]
            outside = torch.ones_like(change, dtype=torch.bool)
            outside[top : top + side, left : left + side] = False
            assert change[outside].max() == 0
            # what changed inside the box, pooled back to 8x8, follows the digit's own pattern (loosely: the change
            # is |ink - background| times the digit, and textured backgrounds vary it)
            assert correlation(change[top : top + side, left : left + side], digits.images[layout["digit"]]) > 0.6


def correlation(region: torch.Tensor, digit: np.ndarray) -> float:
    pooled = F.adaptive_avg_pool2d(region[None], 8)[0]
    return torch.corrcoef(torch.stack([pooled.flatten(), torch.from_numpy(digit).float().flatten()]))[0, 1].item()


def test_pasted_digit_on_a_flat_canvas_is_the_digit_scaled():
    digit = load_digits().images[7]
    canvas = torch.full((3, IMAGE_SIZE, IMAGE_SIZE), 0.75)
    pasted = merge_task.paste_digit(canvas, digit, (10, 20, 24), contrast=1.0, ink=[0.0, 0.1, 0.2])
    change = (canvas - pasted)[0]  # ink 0 on 0.75: the change is 0.75 times the digit's alpha
    assert change[:10].abs().max() == 0 and change[34:].abs().max() == 0 and change[:, :20].abs().max() == 0
    assert change.max() <= 0.75 + 1e-6 and correlation(change[10:34, 20:44], digit) > 0.95


def test_smallest_setting_runs_end_to_end(tmp_path):
    text = merge_task.main(
        ["--train_images", "32", "--test_images", "16", "--epochs", "1", "--hidden_size", "16", "--layers", "2"]
        + ["--heads", "2", "--r_values", "8", "--finetune_r", "8", "--timing_batch", "4", "--timing_repeats", "1"]
        + ["--results_dir", str(tmp_path), "--save_model", str(tmp_path / "model"), "--share_batch", "0"]
        + ["--timing_runs", "2"]
    )
    assert "## Off the shelf" in text and "fine-tuning with merging on" in text
    with open(tmp_path / "merge_task.csv") as handle:
        rows = list(csv.DictReader(handle))
    # where the timings put a bipartite point in doubt, a table of the pairs timed alone follows (it has no mode)
    head_to_head = [row for row in rows if not row["mode"]]
    assert all(row["verdict"] in ("slower", "as fast") and row["setting"] for row in head_to_head)
    rows = [row for row in rows if row["mode"]]
    modes = list(merge_task.MODES)
    # off the shelf and after fine-tuning: the unmerged model, then each mode at r=8
    assert [row["mode"] for row in rows] == 2 * ["none", *modes]
    at_r8 = {row["mode"]: row for row in rows if row["r"] == "8"}
    # 2 layers, 65 tokens: 8 merged in each, for every mode alike
    assert {row["schedule"] for row in at_r8.values()} == {"8/8"} and at_r8["ward"]["tokens left"] == "49"
    unmerged = [row for row in rows if row["mode"] == "none"]
    assert all(float(row["KL"]) == 0 for row in unmerged)
    assert at_r8["bipartite"]["gain at equal speed"] == "0.0"  # the reference against itself
    kl_ratio = float(at_r8["bipartite"]["KL over bipartite's at equal speed"])
    assert kl_ratio == 1.0 or math.isnan(kl_ratio)  # NaN: the merges moved no prediction (KL 0)
    assert (tmp_path / "merge_task.png").stat().st_size > 0
    assert all(float(row["spread %"]) >= 0 for row in rows) and "2 separate timing run(s)" in text
    assert "timed again alone" in text

    # The saved model and its recipe give the same model and data again: the same qualities, no training
    again = merge_task.main(
        ["--base_model", str(tmp_path / "model"), "--test_images", "16", "--r_values", "8", "--finetune_r"]
        + ["--timing_batch", "4", "--timing_repeats", "1", "--timing_runs", "1", "--share_batch", "0"]
        + ["--results_dir", str(tmp_path), "--name", "again", "--hidden_size", "99"]  # the recipe's width wins
        + ["--no-head_to_head"]
    )
    assert "Training without merging" not in again and "width 16" in again and "timed again alone" not in again
    with open(tmp_path / "again.csv") as handle:
        rerun = list(csv.DictReader(handle))
    assert [(row["mode"], row["accuracy %"], row["KL"]) for row in rerun] == [
        (row["mode"], row["accuracy %"], row["KL"]) for row in rows[: len(rerun)]
    ]

    # The saved model reads the saved images through its image processor as the benchmark fed them
    from PIL import Image
    from transformers import AutoImageProcessor

    model = merge_task.ConformerForImageClassification.from_pretrained(tmp_path / "model").eval()
    processor = AutoImageProcessor.from_pretrained(tmp_path / "model")
    test = merge_task.cluttered_digits(16, "test", 32, 0)
    saved = sorted((tmp_path / "model").glob("test_*.png"), key=lambda path: int(path.name.split("_")[1]))
    assert [path.name for path in saved] == [f"test_{i}_digit_{test['labels'][i]}.png" for i in range(6)]
    images = [np.array(Image.open(path)) for path in saved]
    assert all(np.array_equal(image, test["images"][i].permute(1, 2, 0).numpy()) for i, image in enumerate(images))
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixel_values, merge_task.to_pixel_values(test["images"][:6]), atol=1e-6, rtol=0)
    torch.testing.assert_close(model(pixel_values).logits, merge_task.predict(model, test["images"][:6]))


def test_save_model_refuses_a_folder_with_other_files(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as error:
        merge_task.parse_args(["--save_model", str(tmp_path)])
    assert error.value.code == 2 and "holds files this script does not write" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"
    (tmp_path / "notes.txt").unlink()
    (tmp_path / "config.json").write_text("{}")  # what an earlier save wrote may be replaced
    (tmp_path / "test_0_digit_7.png").write_bytes(b"")
    assert merge_task.parse_args(["--save_model", str(tmp_path)]).save_model == tmp_path


def test_equal_speed_columns_take_bipartites_best_schedule_at_the_same_speed_or_faster_by_hand():
    rows = [
        {"mode": "none", "images/s": 18.0, "accuracy %": 80.0, "KL": 0.0},  # as fast or faster: 20 (74, KL 0.4)
        {"mode": "bipartite", "images/s": 10.0, "accuracy %": 70.0, "KL": 0.2},  # 10 and 20: best 74, least KL 0.2
        {"mode": "bipartite", "r": "staged 4", "images/s": 20.0, "accuracy %": 74.0, "KL": 0.4},  # itself
        {"mode": "ward", "images/s": 15.0, "accuracy %": 73.0, "KL": 0.15},  # 20: 74, KL 0.4
        {"mode": "ward", "images/s": 5.0, "accuracy %": 75.0, "KL": 0.1},  # both: 74, KL 0.2
        {"mode": "ward", "images/s": 25.0, "accuracy %": 72.0, "KL": 0.3},  # faster than every bipartite point
    ]
    rows = merge_task.add_equal_speed_columns(rows)
    assert [row["gain at equal speed"] for row in rows[:5]] == pytest.approx([6.0, -4.0, 0.0, -1.0, 1.0])
    ratios = [row["KL over bipartite's at equal speed"] for row in rows[:5]]
    assert ratios == pytest.approx([0.0, 1.0, 1.0, 0.375, 0.5])
    assert math.isnan(rows[5]["gain at equal speed"]) and math.isnan(rows[5]["KL over bipartite's at equal speed"])


def test_equal_speed_drops_bipartites_points_only_when_every_run_times_them_slower_by_hand():
    from conformer_vit.sweep import Timing

    run = {  # three interleaved rounds: the quartiles of three ratios are the lowest, middle and highest
        ("bipartite", 1): Timing(0, 0, [95.0, 90.0, 99.0]),
        ("ward", 1): Timing(0, 0, [100.0, 100.0, 100.0]),  # bipartite / ward: 0.95, 0.90, 0.99, all below 1
        ("ward", 2): Timing(0, 0, [97.0, 88.0, 98.0]),  # 0.979, 1.023, 1.010: bipartite is as fast in one round
    }
    assert merge_task.slower_beyond_noise([run], ("bipartite", 1), ("ward", 1))
    assert not merge_task.slower_beyond_noise([run], ("bipartite", 1), ("ward", 2))
    as_fast_again = {key: Timing(0, 0, [100.0, 100.0, 100.0]) for key in run}  # a second run: all alike
    assert not merge_task.slower_beyond_noise([run, as_fast_again], ("bipartite", 1), ("ward", 1))
    rows = [
        {"mode": "bipartite", "r": 1, "images/s": 95.0, "accuracy %": 70.0, "KL": 0.2},
        {"mode": "ward", "r": 1, "images/s": 100.0, "accuracy %": 71.0, "KL": 0.1},
        {"mode": "ward", "r": 2, "images/s": 97.0, "accuracy %": 71.0, "KL": 0.1},
    ]

    def as_fast(point, row):
        return not merge_task.slower_beyond_noise([run], merge_task.timing_key(point), merge_task.timing_key(row))

    rows = merge_task.add_equal_speed_columns(rows, as_fast)
    assert math.isnan(rows[1]["gain at equal speed"])  # bipartite is slower beyond the noise: no point to compare
    assert rows[2]["gain at equal speed"] == pytest.approx(1.0) and rows[2][merge_task.KL_AT_EQUAL_SPEED] == 0.5
    assert rows[0]["gain at equal speed"] == 0.0  # the reference against itself: ratios of 1


def test_doubtful_bipartite_points_are_timed_alone_once_and_only_where_they_decide_a_column_by_hand():
    from conformer_vit.sweep import Timing

    def row(mode, r, speed, accuracy, kl):
        return {"mode": mode, "r": r, "images/s": speed, "accuracy %": accuracy, "KL": kl}

    off_the_shelf = [
        row("none", 0, 90.0, 80.0, 0.0),
        row("bipartite", 1, 120.0, 70.0, 0.5),  # faster than the ward row: counts without a doubt
        row("bipartite", 2, 95.0, 72.0, 0.2),  # slower at the median, better: decides the columns
        row("bipartite", 3, 97.0, 69.0, 0.6),  # slower at the median, worse than 1 on both: changes nothing
        row("bipartite", 4, 60.0, 75.0, 0.1),  # slower beyond the noise in the run of every setting
        row("ward", 1, 100.0, 71.0, 0.3),
    ]
    fine_tuned = [dict(item) for item in off_the_shelf]  # the same settings again: no pair is timed twice

    def as_fast_in_the_run(point, row):
        return point["r"] != 4

    timed = []

    def time_pair(point_key, row_key):  # alone, bipartite 2 is slower in every round of both runs
        timed.append((point_key, row_key))
        run = {point_key: Timing(0, 0, [95.0, 94.0, 96.0]), row_key: Timing(0, 0, [100.0, 100.0, 100.0])}
        return [run, run]

    tables = {"off the shelf": off_the_shelf, "fine-tuned": fine_tuned}
    verdicts, report = merge_task.confirm_head_to_head(tables, as_fast_in_the_run, time_pair)
    assert timed == [(("bipartite", 2), ("ward", 1))] and verdicts == {tuple(timed[0]): True}
    assert report == [{
        "setting": "ward 1", "bipartite point": "2", "speed ratio per round, quartiles of each run":
        "0.94/0.95/0.96; 0.94/0.95/0.96", "verdict": "slower",
    }]  # fmt: skip

    as_fast = merge_task.overruled(as_fast_in_the_run, verdicts)
    ward = merge_task.add_equal_speed_columns(off_the_shelf, as_fast)[-1]
    # bipartite 1 and 3 remain: best accuracy 70, least KL 0.5
    assert ward["gain at equal speed"] == pytest.approx(1.0) and ward[merge_task.KL_AT_EQUAL_SPEED] == 0.6


def test_frontier_columns_by_hand():
    rows = [
        {"mode": "none", "images/s": 10.0, "accuracy %": 80.0, "KL": 0.0},  # most accurate, no KL: on both
        {"mode": "bipartite", "images/s": 20.0, "accuracy %": 70.0, "KL": 0.3},  # fastest: on both
        {"mode": "ward", "images/s": 15.0, "accuracy %": 75.0, "KL": 0.4},  # on accuracy; 20 has less KL
        {"mode": "ward", "images/s": 12.0, "accuracy %": 74.0, "KL": 0.1},  # 15 beats it on accuracy; on KL
    ]
    rows = merge_task.add_frontier_columns(rows)
    assert [row["frontier accuracy"] for row in rows] == ["yes", "yes", "yes", "no"]
    assert [row["frontier KL"] for row in rows] == ["yes", "yes", "no", "yes"]


def test_pooled_speed_by_hand():
    from conformer_vit.sweep import Timing

    runs = [{"a": Timing(0, 0, [10.0, 12.0, 11.0])}, {"a": Timing(0, 0, [14.0, 13.0, 15.0])}]
    median, spread = merge_task.pooled_speed(runs)["a"]
    # all rounds 10..15: median 12.5; quartiles (exclusive method) 10.75 and 14.25; run medians 11 and 14
    assert median == 12.5 and spread == pytest.approx(100 * 3.5 / 12.5)
    runs = [{"a": Timing(0, 0, [10.0, 10.0, 10.0, 20.0])}]  # one run: the rounds' interquartile range
    assert merge_task.pooled_speed(runs)["a"] == pytest.approx((10.0, 100 * (17.5 - 10.0) / 10.0))


def test_base_model_must_be_a_folder_saved_by_this_script(tmp_path, capsys):
    with pytest.raises(SystemExit) as error:
        merge_task.parse_args(["--base_model", str(tmp_path)])
    assert error.value.code == 2 and "holds no merge_task_training.json" in capsys.readouterr().err
    (tmp_path / "merge_task_training.json").write_text('{"hidden_size": 8}')
    with pytest.raises(SystemExit) as error:
        merge_task.parse_args(["--base_model", str(tmp_path)])
    assert error.value.code == 2 and "is not a recipe of this script" in capsys.readouterr().err


def test_merge_share_is_a_share_of_layer_plus_merge_for_every_mode():
    config = merge_task.task_config(32, 1, 2, 32, 4)
    shares = merge_task.merge_share(config, merge_r=4, batch=2, repeats=1)
    assert set(shares) == set(merge_task.MODES) and all(0 < share < 100 for share in shares.values())


def test_name_must_be_a_plain_file_name(capsys):
    with pytest.raises(SystemExit) as error:
        merge_task.parse_args(["--name", "../elsewhere"])
    assert error.value.code == 2 and "must be a plain file name" in capsys.readouterr().err
    assert merge_task.parse_args(["--name", "merge_task_64px"]).name == "merge_task_64px"
