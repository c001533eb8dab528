"""transformers' ViT family as Conformers: each source class, built by transformers from a small random config with
every parameter randomised (so that layer scale, norms and heads matter), against its own outputs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers import BertConfig, BertModel, ResNetConfig, ResNetModel

from configuration_conformer import MERGE_MODES
from conformer_vit.sources import SOURCE_CLASSES
from modeling_conformer import ConformerForImageClassification, ConformerModel

REPO = Path(__file__).resolve().parents[1]
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
WITH_MLP = {**TINY, "intermediate_size": 64}
LABELS = {"num_labels": 3}

# class name -> (config class, config kwargs); one entry per source class Conformer takes.
SOURCES = {
    "ViTModel": ("ViTConfig", WITH_MLP),
    "ViTForImageClassification": ("ViTConfig", {**WITH_MLP, **LABELS}),
    "ViTMSNModel": ("ViTMSNConfig", WITH_MLP),
    "DeiTModel": ("DeiTConfig", WITH_MLP),
    "DeiTForImageClassification": ("DeiTConfig", {**WITH_MLP, **LABELS}),
    "DeiTForImageClassificationWithTeacher": ("DeiTConfig", {**WITH_MLP, **LABELS}),
    "Dinov2Model": ("Dinov2Config", TINY),
    "Dinov2ForImageClassification": ("Dinov2Config", {**TINY, "use_swiglu_ffn": True, **LABELS}),
    "Dinov2WithRegistersModel": ("Dinov2WithRegistersConfig", {**TINY, "num_register_tokens": 2}),
    "Dinov2WithRegistersForImageClassification": (
        "Dinov2WithRegistersConfig",
        {**TINY, "num_register_tokens": 3, **LABELS},
    ),
    "CLIPVisionModel": ("CLIPVisionConfig", WITH_MLP),
    "CLIPModel": ("CLIPConfig", {"vision_config": WITH_MLP, "text_config": {**WITH_MLP, "vocab_size": 50}}),
    "SiglipVisionModel": ("SiglipVisionConfig", WITH_MLP),
    "SiglipModel": ("SiglipConfig", {"vision_config": WITH_MLP, "text_config": {**WITH_MLP, "vocab_size": 50}}),
    "IJepaModel": ("IJepaConfig", WITH_MLP),
    "IJepaForImageClassification": ("IJepaConfig", {**WITH_MLP, **LABELS}),
}
# Sources whose forward takes `interpolate_pos_encoding` (DINOv2 always interpolates).
INTERPOLATES = {name for name in SOURCES if not name.startswith(("Dinov2", "CLIPModel", "SiglipModel"))}
PREFIX_TOKENS = {"DeiT": 2, "Dinov2WithRegistersModel": 3, "Dinov2WithRegistersFor": 4, "Siglip": 0, "IJepa": 0}
TOLERANCE = 1e-4


def build_source(name: str):
    config_class, kwargs = SOURCES[name]
    torch.manual_seed(0)
    model = getattr(transformers, name)(getattr(transformers, config_class)(**kwargs)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def num_prefix_tokens(name: str) -> int:
    return next((count for prefix, count in PREFIX_TOKENS.items() if name.startswith(prefix)), 1)


def vision_outputs(source, pixels, **kwargs):
    if type(source).__name__ in ("CLIPModel", "SiglipModel"):
        return source.vision_model(pixels, **kwargs)
    return source(pixels, **kwargs)


def pixels(height=32, width=32, batch=2):
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(1))


def test_every_supported_class_is_tested():
    assert set(SOURCES) == set(SOURCE_CLASSES)


@pytest.mark.parametrize("name", list(SOURCES))
def test_merging_off_gives_what_the_source_gives(name):
    source = build_source(name)
    has_head = "ForImageClassification" in name
    target = ConformerForImageClassification if has_head else ConformerModel
    model = target.from_transformers(source).eval()
    sizes = [(32, 32)] + ([(48, 40)] if name in INTERPOLATES else [(48, 48)] if name.startswith("Dinov2") else [])
    with torch.no_grad():
        for height, width in sizes:
            images = pixels(height, width)
            kwargs = {"interpolate_pos_encoding": True} if (height, width) != (32, 32) and name in INTERPOLATES else {}
            expected, ours = vision_outputs(source, images, **kwargs), model(images, **kwargs)
            if has_head:
                assert torch.allclose(ours.logits, expected.logits, atol=TOLERANCE), (name, height, width)
                continue
            assert torch.allclose(ours.last_hidden_state, expected.last_hidden_state, atol=TOLERANCE), name
            expected_pooled = getattr(expected, "pooler_output", None)
            if expected_pooled is None:
                assert ours.pooler_output is None
            else:
                assert torch.allclose(ours.pooler_output, expected_pooled, atol=TOLERANCE), name


@pytest.mark.parametrize("merge_mode", [mode for mode in MERGE_MODES if mode != "none"])
@pytest.mark.parametrize("name", list(SOURCES))
def test_prefix_tokens_neither_merge_nor_absorb(name, merge_mode):
    labels = {} if "ForImageClassification" in name else LABELS  # a backbone needs classes for a new head
    model = ConformerForImageClassification.from_transformers(
        build_source(name), merge_mode=merge_mode, merge_r=3, **labels
    )
    with torch.no_grad():
        outputs = model(pixels(), output_merge_info=True)
    prefix = num_prefix_tokens(name)
    assert outputs.token_sizes.shape == (2, prefix + 16 - 6)
    assert torch.equal(outputs.token_sizes[:, :prefix], torch.ones(2, prefix))  # absorbed nothing
    assert torch.equal(outputs.source_map[:, :prefix], torch.arange(prefix).expand(2, -1))  # stayed in place
    patches_to_prefix = (outputs.source_map[:, prefix:, None] == torch.arange(prefix)).any()
    assert not patches_to_prefix  # no patch joined a prefix token
    assert torch.equal(outputs.token_sizes.sum(-1), torch.full((2,), float(prefix + 16)))


def test_attention_pooling_gets_proportional_attention():
    # SigLIP's pooling probe over merged tokens equals the probe over the unmerged tokens it stands for, when each
    # merged token is the exact copy of its patches: duplicated patches make that so.
    model = ConformerModel.from_transformers(build_source("SiglipVisionModel")).eval()
    head = model.attention_pooler
    tokens = torch.randn(1, 4, 32)
    sizes = torch.tensor([[1.0, 3.0, 2.0, 1.0]])
    expanded = tokens.repeat_interleave(sizes[0].long(), dim=1)
    with torch.no_grad():
        assert torch.allclose(head(tokens, sizes), head(expanded), atol=1e-5)
        assert not torch.allclose(head(tokens), head(expanded), atol=1e-3)


@pytest.mark.parametrize("name", list(SOURCES))
def test_one_training_step_with_merging_and_the_cnn_head(name):
    model = ConformerForImageClassification.from_transformers(
        build_source(name), num_labels=4, merge_mode="submodular", merge_r=2, classifier="cnn"
    ).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(2):  # the new head starts at zero: the backbone gets its first gradient in the second step
        optimizer.zero_grad()
        loss = model(pixels(), labels=torch.tensor([0, 3])).loss
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert "cnn_head.layers.0.weight" in changed and any(".layers.0.attention.q_proj" in n for n in changed)


def test_new_labels_give_both_teacher_heads_a_zero_start():
    # The ViT paper's transfer recipe: uniform predictions at the first step, so neither of DeiT's heads keeps weights.
    model = ConformerForImageClassification.from_transformers(
        build_source("DeiTForImageClassificationWithTeacher"), num_labels=5
    )
    with torch.no_grad():
        assert torch.equal(model(pixels()).logits, torch.zeros(2, 5))


def test_unsupported_models_get_an_error_naming_the_supported_ones(tmp_path):
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64))
    with pytest.raises(TypeError, match="BertModel.*Dinov2Model"):
        ConformerModel.from_transformers(bert)
    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1])).save_pretrained(tmp_path / "resnet")
    with pytest.raises(ValueError, match="'resnet'.*not one of the ViT family.*SiglipVisionModel"):
        ConformerForImageClassification.from_transformers(str(tmp_path / "resnet"))


def test_a_saved_folder_is_loaded_with_its_own_class(tmp_path):
    source = build_source("Dinov2WithRegistersForImageClassification")
    source.save_pretrained(tmp_path / "source")
    model = ConformerForImageClassification.from_transformers(str(tmp_path / "source")).eval()
    with torch.no_grad():
        assert torch.allclose(model(pixels()).logits, source(pixels()).logits, atol=TOLERANCE)


RELOAD = """
import json, sys, torch
from transformers import AutoModel, AutoModelForImageClassification
pixels = torch.load(sys.argv[1], weights_only=True)
results = {}
for folder, kind in json.loads(sys.argv[2]).items():
    auto = AutoModelForImageClassification if kind == "head" else AutoModel
    model = auto.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        outputs = model(pixels)
    results[folder] = (outputs.logits if kind == "head" else outputs.last_hidden_state).tolist()
print(json.dumps(results))
"""


@pytest.mark.slow
def test_saved_conformers_reload_through_auto_classes_in_a_fresh_process(tmp_path):
    images = pixels()
    torch.save(images, tmp_path / "pixels.pt")
    folders, expected = {}, {}
    for name in SOURCES:
        source = build_source(name)
        has_head = "ForImageClassification" in name
        model = (ConformerForImageClassification if has_head else ConformerModel).from_transformers(source)
        folder = str(tmp_path / name)
        model.save_pretrained(folder)
        folders[folder] = "head" if has_head else "base"
        with torch.no_grad():
            out = vision_outputs(source, images)
        expected[folder] = out.logits if has_head else out.last_hidden_state
    result = subprocess.run(
        [sys.executable, "-c", RELOAD, str(tmp_path / "pixels.pt"), json.dumps(folders)],
        cwd=tmp_path,  # not the repository: the classes must come from each folder's copy of the remote code
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    reloaded = json.loads(result.stdout.strip().splitlines()[-1])
    for folder, values in reloaded.items():
        assert torch.allclose(torch.tensor(values), expected[folder], atol=TOLERANCE), folder
