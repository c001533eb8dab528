"""The converter against timm's own loader of Google's `.npz` format, on tiny synthetic checkpoints.

Each checkpoint is written in Google's exact key layout (the one timm's `_load_weights` reads) with random weights;
the reference is timm's `VisionTransformer` of the same shape, built here and loaded by timm, never by our code.
"""

import json
import os
import resource
import signal
import subprocess
import sys
import zipfile
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import HUB_FOLDER_FILES, TINY_VIT, google_vit_params
from huggingface_hub import ModelCard
from timm.layers import HybridEmbed
from timm.models.vision_transformer import VisionTransformer, _load_weights
from timm.models.vision_transformer_hybrid import _resnetv2

import convert_npz_to_hf as converter
from configuration_conformer import CLASSIFIERS, MERGE_MODES, ConformerConfig
from conformer_vit import cards, google_npz
from conformer_vit.hub_folder import hub_folder_files
from modeling_conformer import ConformerForImageClassification
from token_merging import parse_merge_r

REPO_DIR = Path(__file__).resolve().parents[1]
WIDTH, DEPTH, HEADS, MLP, PATCH, GRID, CLASSES = (
    TINY_VIT[k] for k in ("width", "depth", "heads", "mlp", "patch", "grid", "classes")
)
TOLERANCE = 1e-4


def timm_model(image_size, backbone_depths=None, num_classes=CLASSES, no_embed_class=False):
    """timm's ViT of the synthetic shape; the hybrid as timm's `vit_base_r50_s16_224` builds it, with tiny stages."""
    kwargs = dict(
        img_size=image_size,
        embed_dim=WIDTH,
        depth=DEPTH,
        num_heads=HEADS,
        mlp_ratio=MLP / WIDTH,
        num_classes=num_classes,
        no_embed_class=no_embed_class,
    )
    if backbone_depths:
        backbone = _resnetv2(layers=tuple(backbone_depths))  # ResNetV2, StdConv2dSame(eps=1e-8), preact=False, "same"
        kwargs.update(
            patch_size=PATCH // 2 ** (len(backbone_depths) + 1), embed_layer=partial(HybridEmbed, backbone=backbone)
        )
    else:
        kwargs.update(patch_size=PATCH)
    return VisionTransformer(**kwargs).eval()


def random_pixels(image_size, batch=2):
    return torch.rand(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.fixture
def plain_npz(tmp_path, google_npz):
    return google_npz(tmp_path / "ViT-tiny.npz")


def write_npz(path, params):
    np.savez(path, **params)
    return path


# --------------------------------------------------------------------------------------------------------------------
# Exactness against timm
# --------------------------------------------------------------------------------------------------------------------

CASES = {
    "plain": dict(params={}, image_size=32),
    "plain-resized": dict(params={}, image_size=48),
    "hybrid": dict(params=dict(backbone_depths=[1, 1]), image_size=32),
    "hybrid-gn-1x1x1xC-resized": dict(params=dict(backbone_depths=[1, 1], gn_4d=True), image_size=48),
    "big-vision-stacked": dict(params=dict(big_vision=True), image_size=32),
    "big-vision-no-class-slot-resized": dict(params=dict(big_vision=True, position_class_slot=False), image_size=48),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
@torch.no_grad()
def test_logits_equal_timm_loader(tmp_path, case):
    params, image_size = CASES[case]["params"], CASES[case]["image_size"]
    path = write_npz(tmp_path / "checkpoint.npz", google_vit_params(**params))
    reference = timm_model(
        image_size,
        backbone_depths=params.get("backbone_depths"),
        no_embed_class=not params.get("position_class_slot", True),
    )
    _load_weights(reference, str(path))  # resamples position embeddings itself when the grid differs

    model = google_npz.convert_checkpoint(path, image_size=image_size)

    pixels = random_pixels(image_size)
    expected = reference(pixels)
    assert model.config.image_size == image_size
    assert (model(pixels).logits - expected).abs().max().item() < TOLERANCE


@pytest.mark.parametrize("backbone_depths", [None, [1, 1]], ids=["plain", "hybrid"])
@torch.no_grad()
def test_pre_logits_equal_head_of_tanh_computed_by_hand(tmp_path, backbone_depths):
    # A representation width unlike the hidden width, so a transposed kernel cannot pass.
    params = google_vit_params(representation_size=24, backbone_depths=backbone_depths, gn_4d=True)
    path = write_npz(tmp_path / "in21k.npz", params)
    reference = timm_model(32, backbone_depths=backbone_depths, num_classes=0)  # timm drops pre_logits
    _load_weights(reference, str(path))

    model = google_npz.convert_checkpoint(path)

    pixels = random_pixels(32)
    cls = reference.forward_head(reference.forward_features(pixels), pre_logits=True)
    hidden = torch.tanh(
        cls @ torch.from_numpy(params["pre_logits/kernel"]) + torch.from_numpy(params["pre_logits/bias"])
    )
    expected = hidden @ torch.from_numpy(params["head/kernel"]) + torch.from_numpy(params["head/bias"])
    assert model.config.representation_size == 24
    assert (model(pixels).logits - expected).abs().max().item() < TOLERANCE


def test_new_num_labels_gives_zero_head_without_pre_logits(tmp_path):
    path = write_npz(tmp_path / "in21k.npz", google_vit_params(representation_size=24))
    model = google_npz.convert_checkpoint(path, num_labels=3, merge_mode="bipartite", merge_r=2)
    assert model.pre_logits is None and model.config.representation_size is None
    assert model.classifier.weight.shape == (3, WIDTH)
    assert not model.classifier.weight.any() and not model.classifier.bias.any()
    assert model.config.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    assert (model.config.merge_mode, model.config.merge_r) == ("bipartite", 2)


def test_a_new_cnn_head_starts_the_same_in_every_conversion_and_leaves_the_callers_random_state(plain_npz):
    torch.manual_seed(1)
    expected_draw = torch.rand(3)
    torch.manual_seed(1)
    first = google_npz.convert_checkpoint(plain_npz, num_labels=3, classifier="cnn").state_dict()
    assert torch.equal(torch.rand(3), expected_draw)  # the conversion drew from a random state of its own
    second = google_npz.convert_checkpoint(plain_npz, num_labels=3, classifier="cnn").state_dict()
    cnn_keys = [key for key in first if key.startswith("cnn_head.")]
    assert cnn_keys and any(first[key].std() > 0 for key in cnn_keys)  # randomly initialised, not zeros
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_infer_config_reads_architecture_from_shapes():
    params = google_vit_params(representation_size=24, backbone_depths=[1, 1])
    config, _ = google_npz.infer_config(params)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (WIDTH, DEPTH, HEADS)
    assert (config.intermediate_size, config.patch_size, config.image_size) == (MLP, PATCH, GRID * PATCH)
    assert config.backbone_depths == [1, 1] and config.representation_size == 24 and config.num_labels == CLASSES
    assert config.layer_norm_eps == 1e-6 and config.hidden_act == "gelu"


def test_imagenet_1k_head_gets_imagenet_class_names():
    config, _ = google_npz.infer_config(google_vit_params(classes=1000))
    assert config.id2label[0] == "tench, Tinca tinca" and config.id2label[999].startswith("toilet tissue")


def test_model_type_mismatch_says_what_the_file_contains():
    with pytest.raises(google_npz.ConversionError, match=r"ViT-B_16 does not match .*width 32, 2 layers, 2 heads"):
        google_npz.infer_config(google_vit_params(), model_type="ViT-B_16")


# --------------------------------------------------------------------------------------------------------------------
# The folder and its model card
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_convert_writes_a_hub_folder_that_loads_in_a_fresh_process(tmp_path, capsys):
    path = write_npz(tmp_path / "R50+tiny.npz", google_vit_params(backbone_depths=[1, 1]))
    out = converter.convert(path, tmp_path / "out", verify=True, merge_mode="submodular", merge_r=2)

    assert sorted(p.name for p in out.iterdir()) == HUB_FOLDER_FILES
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind
    assert "verify: largest |ours - timm|" in capsys.readouterr().out
    auto_map = json.loads((out / "config.json").read_text())["auto_map"]
    assert {"AutoConfig", "AutoModel", "AutoModelForImageClassification"} <= set(auto_map)
    processor = json.loads((out / "preprocessor_config.json").read_text())
    assert processor["image_processor_type"] == "ViTImageProcessor"
    assert processor["size"] == {"height": 32, "width": 32} and processor["image_mean"] == [0.5] * 3

    # Remote code, loaded from elsewhere by a process that never imported our modules; logits equal timm's.
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForImageClassification\n"
        "model = AutoModelForImageClassification.from_pretrained(\n"
        "    sys.argv[1], trust_remote_code=True, merge_mode='none')\n"
        "pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1\n"
        "torch.save(model.eval()(pixels).logits.detach(), sys.argv[2])\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    subprocess.run(
        [sys.executable, "-c", script, str(out), str(tmp_path / "logits.pt")], cwd=tmp_path, env=env, check=True
    )
    reference = timm_model(32, backbone_depths=[1, 1])
    _load_weights(reference, str(path))
    with torch.no_grad():
        expected = reference(random_pixels(32))
    assert (torch.load(tmp_path / "logits.pt") - expected).abs().max().item() < TOLERANCE


def test_model_card_yaml_holds_hub_fields_and_merging(tmp_path):
    path = write_npz(tmp_path / "tiny.npz", google_vit_params())
    out = converter.convert(path, tmp_path / "out", merge_mode="bipartite", merge_r=[2, 1])
    card = ModelCard.load(out / "README.md")
    metadata = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert metadata == card.data.to_dict()
    assert metadata["license"] == "apache-2.0" and metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "image-classification"
    assert {"vision", "image-classification", "vit", "token-merging", "conformer"} <= set(metadata["tags"])
    assert metadata["token_merging"] == {
        "merge_mode": "bipartite",
        "merge_r": [2, 1],
        "proportional_attention": True,
        "classifier": "token",
        "tokens_in": 17,
        "tokens_out": 14,
    }
    assert "--merge_mode bipartite --merge_r 2,1" in card.text


def test_model_card_of_a_fine_tuned_release_holds_upstream_accuracy():
    config = ConformerConfig.from_preset("R50-ViT-B_16", image_size=384, num_labels=1000)
    facts = cards.CardFacts(
        model_type="R50-ViT-B_16",
        source_file="R50+ViT-B_16.npz",
        pretrained_classes=1000,
        source_image_size=384,
        keep_head=True,
        repo_id="r50-vit-b16",
    )
    metadata = ModelCard(cards.render_model_card(config, facts)).data.to_dict()
    assert metadata["datasets"] == ["ILSVRC/imagenet-21k", "ILSVRC/imagenet-1k"]
    result = metadata["model-index"][0]["results"][0]
    assert result["dataset"]["type"] == "ILSVRC/imagenet-1k"
    assert result["metrics"][0]["type"] == "accuracy" and result["metrics"][0]["value"] == 85.082
    assert "github.com/google-research/vision_transformer" in result["source"]["url"]


def test_model_cards_directory_is_what_the_converter_generates(tmp_path, capsys):
    assert converter.main(["--write_model_cards", str(tmp_path)]) == 0
    committed = REPO_DIR / "model_cards"
    expected_names = {f"{model_type}.md" for model_type in cards.SEED_CHECKPOINTS}
    assert {path.name for path in committed.glob("*.md")} == expected_names
    for name in sorted(expected_names):
        assert (committed / name).read_text(encoding="utf-8") == (tmp_path / name).read_text(encoding="utf-8"), (
            f"model_cards/{name} is stale: regenerate with python convert_npz_to_hf.py --write_model_cards"
        )
        metadata = ModelCard.load(committed / name).data.to_dict()
        assert metadata["datasets"] == ["ILSVRC/imagenet-21k"] and metadata["pipeline_tag"] == "image-classification"
    assert "85.082% top-1" in (committed / "R50-ViT-B_16.md").read_text(encoding="utf-8")


def test_push_to_hub_uploads_the_written_folder(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kwargs: calls.append(("create", repo_id)))
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kwargs: calls.append(("upload", kwargs)))
    path = write_npz(tmp_path / "tiny.npz", google_vit_params())
    out = converter.convert(path, tmp_path / "out", push_to_hub="user/tiny-conformer")
    assert calls[0] == ("create", "user/tiny-conformer")
    assert calls[1][1]["repo_id"] == "user/tiny-conformer" and Path(calls[1][1]["folder_path"]) == out
    assert 'from_pretrained("user/tiny-conformer"' in (out / "README.md").read_text()


# --------------------------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit status 2, nothing written
# --------------------------------------------------------------------------------------------------------------------


def run_main_expecting_error(capsys, argv):
    assert converter.main(argv) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    return stderr


def convert_expecting_error(capsys, tmp_path, params, *extra):
    """Write `params` as an npz, run the command line on it; one error line, and nothing written."""
    path = write_npz(tmp_path / "bad.npz", params)
    stderr = run_main_expecting_error(capsys, ["--npz_path", str(path), "--output_dir", str(tmp_path / "out"), *extra])
    assert not (tmp_path / "out").exists()
    return stderr


def add_npy_entry(path, key, shape, data=b""):
    """Append to an npz an entry whose `.npy` header declares `shape` (float32), followed by `data` only."""
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as archive, archive.open(key + ".npy", "w") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": shape})
        f.write(data)
    return path


def test_file_that_is_not_an_npz(tmp_path, capsys):
    (tmp_path / "notes.npz").write_text("not a checkpoint")
    stderr = run_main_expecting_error(
        capsys, ["--npz_path", str(tmp_path / "notes.npz"), "--output_dir", str(tmp_path / "out")]
    )
    assert "not an .npz archive" in stderr
    assert not (tmp_path / "out").exists()


def test_truncated_npz(tmp_path, capsys, plain_npz):
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(plain_npz.read_bytes()[: plain_npz.stat().st_size // 2])
    stderr = run_main_expecting_error(capsys, ["--npz_path", str(truncated), "--output_dir", str(tmp_path / "out")])
    assert "truncated or corrupt" in stderr
    assert not (tmp_path / "out").exists()


def test_object_array_is_refused_not_unpickled(tmp_path, capsys):
    params = google_vit_params()
    params["cls"] = np.array([{"payload": "pickled"}], dtype=object)
    assert "`cls` is an object array" in convert_expecting_error(capsys, tmp_path, params)


def test_missing_key_is_named(tmp_path, capsys):
    params = google_vit_params()
    del params["Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias"]
    stderr = convert_expecting_error(capsys, tmp_path, params)
    assert "missing key `Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias`" in stderr


def test_shape_contradicting_the_architecture_names_both(tmp_path, capsys):
    params = google_vit_params()
    params["Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"] = np.zeros((WIDTH, 100), np.float32)
    stderr = convert_expecting_error(capsys, tmp_path, params)
    assert "`Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel` has shape (32, 100)" in stderr
    assert "needs (32, 64)" in stderr and "MLP 64" in stderr


def test_scalar_for_a_kernel_is_named(tmp_path, capsys):
    params = google_vit_params()
    params["head/kernel"] = np.float32(1.0)
    assert "`head/kernel` is a scalar" in convert_expecting_error(capsys, tmp_path, params)


def test_non_finite_weights_are_named(tmp_path, capsys):
    params = google_vit_params()
    params["Transformer/encoderblock_0/LayerNorm_0/bias"][3] = np.nan
    params["cls"][0, 0, 0] = np.inf
    stderr = convert_expecting_error(capsys, tmp_path, params)
    assert "NaN or inf in `cls`, `Transformer/encoderblock_0/LayerNorm_0/bias`" in stderr


def test_verify_fails_when_the_outputs_are_not_finite(tmp_path, capsys):
    params = google_vit_params()
    params["embedding/kernel"] *= np.float32(1e37)  # finite weights whose patch embeddings overflow to inf
    stderr = convert_expecting_error(capsys, tmp_path, params, "--verify")
    assert "verification failed" in stderr and "not finite" in stderr
    assert [p.name for p in tmp_path.iterdir()] == ["bad.npz"]  # nor a staging folder


def test_entry_declaring_more_memory_than_the_machine_has(tmp_path, capsys, plain_npz):
    add_npy_entry(plain_npz, "cls_huge", (2**50,))
    stderr = run_main_expecting_error(capsys, ["--npz_path", str(plain_npz), "--output_dir", str(tmp_path / "out")])
    assert "`cls_huge` declares shape (1125899906842624,)" in stderr and "memory" in stderr
    assert not (tmp_path / "out").exists()


def test_unused_entry_is_never_decompressed(tmp_path, capsys, plain_npz):
    # Its header declares 256 MiB, behind 1 KiB of (compressed) data: reading it would fail; it is not read.
    add_npy_entry(plain_npz, "extra/unused", (2**26,), data=bytes(1024))
    assert converter.main(["--npz_path", str(plain_npz), "--output_dir", str(tmp_path / "out")]) == 0
    assert "`extra/unused`" in capsys.readouterr().err  # the unused-arrays warning
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_image_size_too_large_to_allocate(tmp_path, capsys, plain_npz):
    argv = ["--npz_path", str(plain_npz), "--output_dir", str(tmp_path / "out"), "--image_size", str(PATCH * 10**6)]
    assert "position embeddings need" in run_main_expecting_error(capsys, argv)


@pytest.mark.slow
def test_disk_full_while_writing_is_one_line_and_leaves_nothing(tmp_path, plain_npz):
    """The real entry point, in its own process, on a real write failure: the file-size limit (with SIGXFSZ ignored)
    makes writes past 32 KiB fail with EFBIG. One line, status 2, no traceback, nothing left behind."""

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (32 * 1024, 32 * 1024))

    result = subprocess.run(
        [sys.executable, str(REPO_DIR / "convert_npz_to_hf.py"), "--npz_path", str(plain_npz), "--output_dir", "out"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"},
        preexec_fn=limit_file_size,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "too large" in result.stderr.lower()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ViT-tiny.npz"]


def test_overwrite_replaces_a_previous_conversion_only(tmp_path, capsys, plain_npz):
    out = tmp_path / "out"
    argv = ["--npz_path", str(plain_npz), "--output_dir", str(out)]
    assert converter.main(argv) == 0
    assert "exists; pass --overwrite" in run_main_expecting_error(capsys, argv)
    assert converter.main([*argv, "--overwrite", "--merge_mode", "ward", "--merge_r", "2"]) == 0
    assert json.loads((out / "config.json").read_text())["merge_mode"] == "ward"

    (out / "notes.txt").write_text("mine")
    stderr = run_main_expecting_error(capsys, [*argv, "--overwrite"])
    assert "a folder holding what this tool did not write" in stderr
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.safetensors").is_file()


@pytest.mark.parametrize("output_dir", [".", "..", "checkpoint folder"])
def test_overwrite_never_targets_the_checkpoint_or_the_working_directory(tmp_path, capsys, monkeypatch, output_dir):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    npz = write_npz(folder / "tiny.npz", google_vit_params())
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.chdir(folder)
    target = str(folder) if output_dir == "checkpoint folder" else output_dir
    stderr = run_main_expecting_error(capsys, ["--npz_path", str(npz), "--output_dir", target, "--overwrite"])
    assert "holds the current directory" in stderr
    assert npz.is_file() and (tmp_path / "notes.txt").is_file()


def test_staging_left_by_a_killed_conversion_is_removed_on_the_next_run(tmp_path, plain_npz):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale, foreign = tmp_path / f".out.converting-{dead.stdout.strip()}", tmp_path / ".out.converting-1-mine"
    for folder in (stale, foreign):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
    (tmp_path / ".out.converting-1-mine" / "notes.txt").write_text("mine")
    assert converter.main(["--npz_path", str(plain_npz), "--output_dir", str(tmp_path / "out")]) == 0
    assert not stale.exists() and (foreign / "notes.txt").is_file()


def test_choices_are_the_configs(capsys):
    actions = {action.dest: action for action in converter.build_parser()._actions}
    assert actions["merge_mode"].choices == MERGE_MODES and actions["classifier"].choices == CLASSIFIERS
    assert "invalid choice: 'tome'" in run_main_expecting_error(capsys, ["--merge_mode", "tome"])


def test_parse_merge_r_takes_an_int_or_one_per_layer():
    assert parse_merge_r("3") == 3 and parse_merge_r("2,1,0") == [2, 1, 0]
    with pytest.raises(ValueError, match="comma-separated ints"):
        parse_merge_r("2;1")


# --------------------------------------------------------------------------------------------------------------------
# transformers' ViT family: folders saved from small random models, loaded as a Hub id would be
# --------------------------------------------------------------------------------------------------------------------

FAMILY_SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)


def family_sources():
    """(name, model, extra command-line flags) for one small model of each class; every parameter randomised (not
    just the init), so that layer scale, norms and biases matter."""
    import transformers

    mlp = dict(FAMILY_SHAPE, intermediate_size=64)
    sources = [
        ("deit", transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(**mlp, num_labels=3)), []),
        (
            "dinov2",
            transformers.Dinov2ForImageClassification(
                transformers.Dinov2Config(**FAMILY_SHAPE, mlp_ratio=2, num_labels=3)
            ),
            ["--merge_mode", "ward", "--merge_r", "2"],
        ),
        ("clip", transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**mlp)), []),
        (
            "siglip",
            transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**mlp)),
            ["--merge_mode", "bipartite", "--merge_r", "2"],
        ),
    ]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, model, _ in sources:
            for parameter in model.parameters():
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return [(name, model.eval(), flags) for name, model, flags in sources]


def family_references(name, model, pixels) -> dict[str, torch.Tensor]:
    """What the source itself computes: the Conformer's `logits` read what its head (or, headless, its pooling)
    reads; SigLIP's classifier pools the mean of the tokens, computed here by hand."""
    with torch.no_grad():
        outputs = model(pixels, output_hidden_states=True)
    if name in ("deit", "dinov2"):
        return {"logits": outputs.logits}
    references = {"last_hidden_state": outputs.last_hidden_state, "pooler_output": outputs.pooler_output}
    references["logits"] = outputs.pooler_output if name == "clip" else outputs.last_hidden_state.mean(dim=1)
    return references


@pytest.mark.slow
def test_from_transformers_writes_hub_folders_that_reload_equal_to_the_source(tmp_path, monkeypatch):
    from transformers import BitImageProcessor

    monkeypatch.chdir(tmp_path)
    sources = family_sources()
    for name, model, _ in sources:
        model.save_pretrained(tmp_path / "org" / f"{name}-tiny")
    BitImageProcessor(crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path / "org" / "dinov2-tiny")
    (tmp_path / "org" / "clip-tiny" / "README.md").write_text("---\nlicense: mit\n---\n\nA tiny CLIP.\n")
    for name, _, flags in sources:
        argv = ["--from_transformers", f"org/{name}-tiny", "--output_dir", f"{name}-conformer", *flags]
        assert converter.main(argv) == 0, name

    for name, _, _ in sources:
        out = tmp_path / f"{name}-conformer"
        assert sorted(p.name for p in out.iterdir()) == sorted(hub_folder_files())
        auto_map = json.loads((out / "config.json").read_text())["auto_map"]
        assert {"AutoConfig", "AutoModel", "AutoModelForImageClassification"} <= set(auto_map)
        processor = json.loads((out / "preprocessor_config.json").read_text())
        if name == "dinov2":  # the source's own
            assert processor["image_processor_type"].startswith("BitImageProcessor")
        else:
            assert processor["image_processor_type"] == "ViTImageProcessor" and processor["size"]["height"] == 32
        card = ModelCard.load(out / "README.md")
        assert card.data.base_model == f"org/{name}-tiny" and f"--from_transformers org/{name}-tiny" in card.text
        assert card.data.license == ("mit" if name == "clip" else None)
    assert "`Dinov2ForImageClassification`" in ModelCard.load(tmp_path / "dinov2-conformer" / "README.md").text
    assert json.loads((tmp_path / "siglip-conformer" / "config.json").read_text())["merge_mode"] == "bipartite"

    # Remote code, in a process that never imported our modules, from another directory; merging off for parity.
    script = (
        "import sys, torch\n"
        "from transformers import AutoModel, AutoModelForImageClassification\n"
        "pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))\n"
        "outputs = {}\n"
        "for folder in sys.argv[2:]:\n"
        "    kwargs = dict(trust_remote_code=True, merge_mode='none')\n"
        "    with torch.no_grad():\n"
        "        base = AutoModel.from_pretrained(folder, **kwargs).eval()(pixels)\n"
        "        logits = AutoModelForImageClassification.from_pretrained(folder, **kwargs).eval()(pixels).logits\n"
        "    outputs[folder] = {'logits': logits, 'last_hidden_state': base.last_hidden_state}\n"
        "    if base.pooler_output is not None:\n"
        "        outputs[folder]['pooler_output'] = base.pooler_output\n"
        "torch.save(outputs, sys.argv[1])\n"
    )
    folders = [str(tmp_path / f"{name}-conformer") for name, _, _ in sources]
    (tmp_path / "elsewhere").mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "outputs.pt"), *folders],
        cwd=tmp_path / "elsewhere",
        env=env,
        check=True,
    )
    reloaded = torch.load(tmp_path / "outputs.pt", weights_only=True)
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for (name, model, _), folder in zip(sources, folders):
        for key, expected in family_references(name, model, pixels).items():
            assert (reloaded[folder][key] - expected).abs().max().item() < TOLERANCE, (name, key)


def test_from_transformers_refuses_a_model_outside_the_family_in_one_line(tmp_path, capsys):
    import transformers

    config = transformers.ConvNextConfig(hidden_sizes=[8, 8, 8, 8], depths=[1, 1, 1, 1], image_size=32)
    transformers.ConvNextModel(config).save_pretrained(tmp_path / "convnext")
    argv = ["--from_transformers", str(tmp_path / "convnext"), "--output_dir", str(tmp_path / "out")]
    stderr = run_main_expecting_error(capsys, argv)
    assert "ConvNextModel" in stderr and "Dinov2Model" in stderr and "SiglipVisionModel" in stderr
    assert not (tmp_path / "out").exists()


def test_from_transformers_and_npz_path_exclude_each_other(tmp_path, capsys, plain_npz):
    argv = ["--npz_path", str(plain_npz), "--from_transformers", "org/model", "--output_dir", str(tmp_path / "out")]
    assert "one of --npz_path, --from_transformers" in run_main_expecting_error(capsys, argv)


# --------------------------------------------------------------------------------------------------------------------
# ONNX export, merging on
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("merge_mode", ["submodular"])  # tests/test_export.py covers every mode through export_onnx
def test_export_onnx_runs_in_onnxruntime_equal_to_eager_with_a_dynamic_batch(tmp_path, google_npz, merge_mode):
    onnxruntime = pytest.importorskip("onnxruntime")
    npz, out, onnx_path = google_npz(tmp_path / "tiny.npz", depth=1), tmp_path / "out", tmp_path / "model.onnx"
    argv = ["--npz_path", str(npz), "--output_dir", str(out), "--merge_mode", merge_mode, "--merge_r", "5"]
    assert converter.main([*argv, "--export_onnx", str(onnx_path)]) == 0
    model = ConformerForImageClassification.from_pretrained(out).eval()
    assert model.config.merge_mode == merge_mode

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (inputs,), (outputs,) = session.get_inputs(), session.get_outputs()
    assert (inputs.name, outputs.name) == ("pixel_values", "logits")
    assert isinstance(inputs.shape[0], str) and inputs.shape[1:] == [3, 32, 32]  # a named, dynamic batch
    for batch in (1, 4):
        pixels = random_pixels(32, batch=batch)
        with torch.no_grad():
            expected = model(pixels).logits
        (logits,) = session.run(["logits"], {"pixel_values": pixels.numpy()})
        assert logits.shape == (batch, CLASSES)
        assert np.abs(logits - expected.numpy()).max() < TOLERANCE


def test_export_onnx_never_replaces_an_existing_file(tmp_path, capsys, plain_npz):
    (tmp_path / "model.onnx").write_text("mine")
    argv = ["--npz_path", str(plain_npz), "--output_dir", str(tmp_path / "out"), "--export_onnx"]
    assert "a file this tool did not write" in run_main_expecting_error(capsys, [*argv, str(tmp_path / "model.onnx")])
    assert (tmp_path / "model.onnx").read_text() == "mine" and not (tmp_path / "out").exists()


@pytest.mark.parametrize("target", ["the npz", "the source's weights", "the output's weights"])
def test_export_onnx_never_writes_over_an_input_or_the_folder_it_writes(tmp_path, capsys, plain_npz, target):
    """The three data-loss cases: the ONNX graph onto the checkpoint, onto a source model's weights, onto the output
    folder's own weights. Each is refused before anything is written, with --overwrite too."""
    source = tmp_path / "source"
    tiny = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=16)
    ConformerForImageClassification(ConformerConfig(**tiny, patch_size=8)).save_pretrained(source)
    out = tmp_path / "out"
    if target == "the output's weights":
        assert converter.main(["--npz_path", str(plain_npz), "--output_dir", str(out)]) == 0
    onnx_path = {"the npz": plain_npz, "the source's weights": source / "model.safetensors"}.get(
        target, out / "model.safetensors"
    )
    before = {path: path.read_bytes() for path in (plain_npz, source / "model.safetensors") if path.exists()}
    before_out = {path.name: path.read_bytes() for path in out.iterdir()} if out.exists() else {}
    input_flags = (
        ["--from_transformers", str(source)] if target == "the source's weights" else ["--npz_path", str(plain_npz)]
    )
    argv = [*input_flags, "--output_dir", str(out), "--overwrite", "--export_onnx", str(onnx_path)]
    stderr = run_main_expecting_error(capsys, argv)
    assert "input" in stderr or "inside --output_dir" in stderr
    assert all(path.read_bytes() == data for path, data in before.items())
    assert ({path.name: path.read_bytes() for path in out.iterdir()} if out.exists() else {}) == before_out


@pytest.mark.slow
def test_export_onnx_replaces_its_own_file_only_with_overwrite(tmp_path, capsys, plain_npz):
    onnx_path = tmp_path / "model.onnx"
    argv = ["--npz_path", str(plain_npz), "--export_onnx", str(onnx_path)]
    assert converter.main([*argv, "--output_dir", str(tmp_path / "a")]) == 0
    assert "pass --overwrite" in run_main_expecting_error(capsys, [*argv, "--output_dir", str(tmp_path / "b")])
    assert converter.main([*argv, "--output_dir", str(tmp_path / "b"), "--overwrite"]) == 0


def card_snippet(card_path: Path) -> str:
    card = ModelCard.load(card_path)  # parses: the metadata is valid YAML the Hub reads
    return card.text.split("```python\n", 1)[1].split("```", 1)[0]


def run_snippet(snippet: str, cwd: Path) -> subprocess.CompletedProcess:
    from PIL import Image

    Image.new("RGB", (60, 40), (120, 30, 200)).save(cwd / "photo.jpg")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(cwd / "modules")}
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, "-c", snippet], cwd=cwd, env=env, capture_output=True, text=True)


@pytest.mark.slow
def test_converted_cards_usage_snippet_runs_as_written_against_the_folder(tmp_path, plain_npz):
    out = tmp_path / "out"
    assert converter.main(["--npz_path", str(plain_npz), "--output_dir", str(out)]) == 0
    snippet = card_snippet(out / "README.md")
    assert str(out) in snippet and "path/to/this/folder" not in snippet
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    done = run_snippet(snippet, workdir)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() in ConformerForImageClassification.from_pretrained(out).config.id2label.values()


def test_google_cards_name_hub_datasets_and_the_transformers_port_as_base_model():
    for model_type in cards.SEED_CHECKPOINTS:
        data = ModelCard(cards.seed_model_card(model_type)).data
        assert data.datasets == ["ILSVRC/imagenet-21k"] and data.license == "apache-2.0"
        expected = None if model_type.startswith("R50") else "google/vit-"
        assert (data.base_model or None) == expected or data.base_model.startswith(expected)
        assert f"{model_type}-conformer" in ModelCard(cards.seed_model_card(model_type)).text


@pytest.mark.slow
@pytest.mark.parametrize("trust_remote_code", [False, True])
def test_a_saved_conformer_folder_converts_and_exports_to_onnx_without_a_prompt(tmp_path, trust_remote_code):
    """A saved (or trained) Conformer folder through --from_transformers: this package's code by default, the folder's
    own with --trust_remote_code (transformers would otherwise prompt for it); the ONNX graph equals the folder's
    model."""
    onnxruntime = pytest.importorskip("onnxruntime")
    tiny = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16)
    source = tmp_path / "saved"
    saved = ConformerForImageClassification(ConformerConfig(**tiny, patch_size=4, merge_mode="ward", merge_r=3))
    saved.eval().save_pretrained(source)
    onnx_path, out = tmp_path / "model.onnx", tmp_path / "out"
    argv = ["--from_transformers", str(source), "--output_dir", str(out), "--export_onnx", str(onnx_path)]
    assert converter.main([*argv, *["--trust_remote_code"] * trust_remote_code]) == 0
    pixels = random_pixels(16, batch=3)
    (logits,) = onnxruntime.InferenceSession(str(onnx_path)).run(["logits"], {"pixel_values": pixels.numpy()})
    with torch.no_grad():
        assert np.abs(logits - saved(pixels).logits.numpy()).max() < TOLERANCE
    assert ModelCard.load(out / "README.md").data.to_dict()["token_merging"]["merge_mode"] == "ward"


@pytest.mark.slow
def test_a_backbone_without_labels_becomes_a_conformer_model_with_its_own_pooling_card_and_onnx(tmp_path):
    """A DINOv2 backbone: no silent zero-class head. The folder holds a `ConformerModel` (feature extraction), whose
    classification head, once labels are given, pools as DINOv2's does (class token and patch mean)."""
    onnxruntime = pytest.importorskip("onnxruntime")
    from transformers import Dinov2Config, Dinov2Model

    tiny = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=4)
    Dinov2Model(Dinov2Config(**tiny)).save_pretrained(tmp_path / "dinov2")
    out, onnx_path = tmp_path / "out", tmp_path / "features.onnx"
    argv = ["--from_transformers", str(tmp_path / "dinov2"), "--output_dir", str(out), "--export_onnx", str(onnx_path)]
    assert converter.main(argv) == 0
    assert json.loads((out / "config.json").read_text())["architectures"] == ["ConformerModel"]
    assert ModelCard.load(out / "README.md").data.pipeline_tag == "image-feature-extraction"
    session = onnxruntime.InferenceSession(str(onnx_path))
    assert [output.name for output in session.get_outputs()] == ["last_hidden_state"]
    with pytest.raises(ValueError, match="no classification head.*num_labels"):
        ConformerForImageClassification.from_transformers(str(tmp_path / "dinov2"))
    classifier = ConformerForImageClassification.from_transformers(str(tmp_path / "dinov2"), num_labels=4)
    assert classifier.config.classifier == "token_gap"
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    done = run_snippet(card_snippet(out / "README.md"), workdir)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "(1, 17, 32)"  # the class token and 16 patches, nothing merged
