"""The model against independent references: transformers' ViT, timm's VisionTransformer, published sizes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import ViTConfig, ViTForImageClassification

from configuration_conformer import PRESETS, ConformerConfig
from modeling_conformer import ConformerForImageClassification, ConformerModel

REPO = Path(__file__).resolve().parents[1]
TINY = dict(
    hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8
)


def tiny_vit(**overrides):
    torch.manual_seed(0)
    config = ViTConfig(**{**TINY, "layer_norm_eps": 1e-6, "num_labels": 5, **overrides})
    vit = ViTForImageClassification(config).eval()
    with torch.no_grad():  # random, non-trivial biases and norms so that every weight matters
        for parameter in vit.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return vit


def tiny_conformer(**overrides):
    torch.manual_seed(0)
    return ConformerForImageClassification(ConformerConfig(**{**TINY, "num_labels": 5, **overrides})).eval()


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_from_vit_matches_transformers_vit(attn_implementation):
    vit = tiny_vit()
    model = ConformerForImageClassification.from_vit(vit, attn_implementation=attn_implementation).eval()
    assert model.config._attn_implementation == attn_implementation
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(pixels).logits, vit(pixels).logits, atol=1e-4)
        # Other resolutions: both resample the position embeddings bicubically.
        larger = torch.randn(2, 3, 48, 40)
        ours = model(larger, interpolate_pos_encoding=True).logits
        assert torch.allclose(ours, vit(larger, interpolate_pos_encoding=True).logits, atol=1e-4)


def test_from_vit_loads_a_saved_vit_folder(tmp_path):
    vit = tiny_vit()
    vit.save_pretrained(tmp_path / "vit")
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        unmerged = ConformerForImageClassification.from_vit(str(tmp_path / "vit")).eval()
        assert torch.allclose(unmerged(pixels).logits, vit(pixels).logits, atol=1e-4)
    merged = ConformerForImageClassification.from_vit(str(tmp_path / "vit"), merge_mode="bipartite", merge_r=2)
    assert merged.config.merge_mode == "bipartite" and merged.config.id2label == vit.config.id2label
    assert torch.equal(merged.classifier.weight, vit.classifier.weight)


def test_from_vit_refuses_a_folder_that_is_not_a_vit(tmp_path):
    from transformers import DeiTConfig, DeiTForImageClassification

    DeiTForImageClassification(DeiTConfig(**TINY)).save_pretrained(tmp_path / "deit")
    with pytest.raises(ValueError, match="'deit'.*ViT"):
        ConformerForImageClassification.from_vit(str(tmp_path / "deit"))
    with pytest.raises(TypeError, match="DeiTForImageClassification"):
        ConformerForImageClassification.from_vit(DeiTForImageClassification(DeiTConfig(**TINY)))


def test_from_vit_at_another_image_size_resamples_positions_bilinearly_as_timm():
    from timm.layers import resample_abs_pos_embed

    vit = tiny_vit()
    model = ConformerForImageClassification.from_vit(vit, image_size=48)
    position = vit.vit.embeddings.position_embeddings.detach()
    expected = resample_abs_pos_embed(position, new_size=(6, 6), num_prefix_tokens=1, interpolation="bilinear")
    assert torch.allclose(model.conformer.embeddings.position_embeddings, expected, atol=1e-6)
    assert model(torch.randn(1, 3, 48, 48)).logits.shape == (1, 5)


def test_from_vit_with_new_labels_gets_a_zero_head_and_no_label_warning(caplog):
    with caplog.at_level("WARNING"):
        model = ConformerForImageClassification.from_vit(tiny_vit(), num_labels=7)
    assert "id2label" not in caplog.text
    assert model.config.num_labels == 7 and len(model.config.id2label) == 7
    assert not model.classifier.weight.any() and not model.classifier.bias.any()


def test_from_vit_takes_a_vit_model_without_head():
    from transformers import ViTModel

    vit = tiny_vit()
    base = ViTModel(vit.config, add_pooling_layer=True).eval()
    base.load_state_dict(vit.vit.state_dict(), strict=False)
    model = ConformerForImageClassification.from_vit(base, num_labels=3).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.conformer(pixels).last_hidden_state, base(pixels).last_hidden_state, atol=1e-5)


def test_matches_timm_vision_transformer():
    torch.manual_seed(0)
    reference = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4, mlp_ratio=2, num_classes=5
    ).eval()
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    model = tiny_conformer()
    ours = {"classifier.weight": reference.head.weight, "classifier.bias": reference.head.bias}
    ours["conformer.embeddings.cls_token"] = reference.cls_token
    ours["conformer.embeddings.position_embeddings"] = reference.pos_embed
    ours["conformer.embeddings.patch_embeddings.projection.weight"] = reference.patch_embed.proj.weight
    ours["conformer.embeddings.patch_embeddings.projection.bias"] = reference.patch_embed.proj.bias
    ours["conformer.layernorm.weight"], ours["conformer.layernorm.bias"] = reference.norm.weight, reference.norm.bias
    for i, block in enumerate(reference.blocks):
        prefix = f"conformer.layers.{i}."
        for name, tensor in zip("qkv", block.attn.qkv.weight.chunk(3)):
            ours[prefix + f"attention.{name}_proj.weight"] = tensor
        for name, tensor in zip("qkv", block.attn.qkv.bias.chunk(3)):
            ours[prefix + f"attention.{name}_proj.bias"] = tensor
        pairs = {
            "attention.o_proj": block.attn.proj,
            "layernorm_before": block.norm1,
            "layernorm_after": block.norm2,
            "mlp.fc1": block.mlp.fc1,
            "mlp.fc2": block.mlp.fc2,
        }
        for name, module in pairs.items():
            ours[prefix + name + ".weight"], ours[prefix + name + ".bias"] = module.weight, module.bias
    model.load_state_dict(ours, strict=True)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(pixels).logits, reference(pixels), atol=1e-4)


def test_save_and_load_round_trip(tmp_path):
    model = tiny_conformer(merge_mode="submodular", merge_r=3, classifier="gap")
    model.save_pretrained(tmp_path)
    loaded = ConformerForImageClassification.from_pretrained(tmp_path).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(pixels).logits, loaded(pixels).logits)
    assert loaded.config.merge_r == 3 and loaded.config.classifier == "gap"


def test_auto_classes_and_pipeline_load_remote_code_in_a_fresh_process(tmp_path):
    model = tiny_conformer(merge_mode="bipartite", merge_r=2)
    folder = tmp_path / "hub_folder"
    model.save_pretrained(folder)
    saved = json.loads((folder / "config.json").read_text())
    assert set(saved["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForImageClassification"}
    assert (folder / "modeling_conformer.py").exists() and (folder / "configuration_conformer.py").exists()
    pixels = torch.randn(1, 3, 32, 32)
    torch.save(pixels, tmp_path / "pixels.pt")
    with torch.no_grad():
        expected = model(pixels).logits
    script = f"""
import numpy as np, torch
from PIL import Image
from transformers import AutoModel, AutoModelForImageClassification, ViTImageProcessor, pipeline
folder = {str(folder)!r}
model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True)
assert type(model).__name__ == "ConformerForImageClassification", type(model)
assert type(AutoModel.from_pretrained(folder, trust_remote_code=True)).__name__ == "ConformerModel"
pixels = torch.load({str(tmp_path / "pixels.pt")!r}, weights_only=True)
print("MAXDIFF", (model(pixels).logits - torch.tensor({expected.tolist()})).abs().max().item())
processor = ViTImageProcessor(size={{"height": 32, "width": 32}}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
classify = pipeline("image-classification", model=model, image_processor=processor)
result = classify(Image.fromarray(np.zeros((40, 50, 3), dtype=np.uint8)))
print("LABELS", [r["label"] for r in result])
"""
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the repo must not be importable
    env["HF_HUB_OFFLINE"] = "1"
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    done = subprocess.run([sys.executable, "-c", script], cwd=workdir, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout.split("MAXDIFF")[1].split()[0]) < 1e-5
    assert "LABEL_" in done.stdout.split("LABELS")[1]


# Published parameter counts without the classification head (millions). Our counts follow the architecture; two of
# the published figures disagree with it (see `test_preset_sizes_match_timm`) and are checked against timm instead.
PUBLISHED_SIZES = {"ViT-B_16": 85.8, "ViT-B_32": 87.5, "ViT-L_32": 305.5, "ViT-H_14": 630.8}


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", sorted(PUBLISHED_SIZES))
def test_preset_sizes_match_published_checkpoints(name):
    with torch.device("meta"):
        model = ConformerModel(ConformerConfig.from_preset(name))
    assert round(count_parameters(model) / 1e6, 1) == PUBLISHED_SIZES[name]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_sizes_match_timm(name):
    """The same architecture in timm has the same number of parameters (its head excluded)."""
    config = ConformerConfig.from_preset(name)
    with torch.device("meta"):
        ours = ConformerModel(config)
        if config.backbone_depths:
            reference = timm.create_model("vit_base_r50_s16_224", pretrained=False, num_classes=0)
        else:
            reference = timm.models.vision_transformer.VisionTransformer(
                img_size=224,
                patch_size=config.patch_size,
                embed_dim=config.hidden_size,
                depth=config.num_hidden_layers,
                num_heads=config.num_attention_heads,
                num_classes=0,
            )
    assert count_parameters(ours) == count_parameters(reference)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_conformer(merge_mode="submodular", merge_r=2, classifier="cnn").train()
    pixels, labels = torch.randn(2, 3, 32, 32), torch.tensor([1, 3])

    def gradients():
        model.zero_grad()
        model(pixels, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    model.activation_checkpointing_enable()
    assert model.conformer.layers[0].gradient_checkpointing
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys() and len(plain) == len(list(model.parameters()))
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6), name


def test_output_attentions_and_hidden_states_follow_the_merges():
    model = ConformerForImageClassification.from_vit(
        tiny_vit(), attn_implementation="eager", merge_mode="bipartite", merge_r=[4, 3, 2]
    )  # per-layer schedule: 17 -> 13 -> 10 -> 8 tokens
    outputs = model(torch.randn(2, 3, 32, 32), output_attentions=True, output_hidden_states=True)
    assert [h.shape[1] for h in outputs.hidden_states] == [17, 13, 10, 8]
    assert [a.shape[-1] for a in outputs.attentions] == [17, 13, 10]  # attention runs before each layer's merge
    assert torch.allclose(outputs.attentions[1].sum(-1), torch.ones(2, 4, 13), atol=1e-5)


def test_forward_features_then_forward_head_is_forward():
    model = tiny_conformer(merge_mode="submodular", merge_r=2, classifier="cnn")
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        split = model.forward_head(model.forward_features(pixels), pixels)
        assert torch.equal(split, model(pixels).logits)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_empty_batch_is_a_clear_error(attn_implementation):
    model = tiny_conformer(merge_mode="bipartite", merge_r=2)
    model.set_attn_implementation(attn_implementation)
    with pytest.raises(ValueError, match="empty batch"):
        model(torch.randn(0, 3, 32, 32))


def test_flex_attention_is_not_declared():
    # transformers refuses it with its own message instead of a crash inside the kernel.
    with pytest.raises(ValueError, match="flex"):
        tiny_conformer().set_attn_implementation("flex_attention")


def test_input_embeddings_are_the_patch_embeddings_as_in_vit():
    model = tiny_conformer()
    assert model.get_input_embeddings() is model.conformer.embeddings.patch_embeddings


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_lora_with_gradient_checkpointing_trains_every_adapter(use_reentrant):
    from peft import LoraConfig, get_peft_model

    def lora_b_with_gradient(model):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        peft_model = get_peft_model(model, lora)
        peft_model.train()
        peft_model(pixel_values=torch.randn(2, 3, 32, 32), labels=torch.tensor([0, 1])).loss.backward()
        grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]
        return len(grads), sum(g is not None and bool(g.abs().sum() > 0) for g in grads)

    # transformers' ViT under the same recipe is the reference: every adapter gets a gradient.
    assert lora_b_with_gradient(tiny_vit()) == (6, 6)
    assert lora_b_with_gradient(tiny_conformer(merge_mode="bipartite", merge_r=2)) == (6, 6)


def test_tuple_outputs_with_return_dict_false():
    logits = tiny_conformer()(torch.randn(1, 3, 32, 32), return_dict=False)[0]
    assert logits.shape == (1, 5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_is_close_to_float32(dtype):
    model = tiny_conformer(merge_mode="submodular", merge_r=3, classifier="gap")
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model(pixels).logits
        half = model.to(dtype)(pixels.to(dtype)).logits
    assert half.dtype == dtype and torch.isfinite(half).all()
    assert torch.allclose(half.float(), reference, atol=0.1)


def test_pre_logits_layer_is_tanh_of_a_linear_map():
    model = tiny_conformer(representation_size=7)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        cls = model.conformer(pixels).last_hidden_state[:, 0]
        dense = model.pre_logits[0]
        expected = model.classifier(torch.tanh(cls @ dense.weight.T + dense.bias))
        assert torch.allclose(model(pixels).logits, expected, atol=1e-6)


def test_hybrid_stem_runs_and_has_the_resnet_stride():
    model = tiny_conformer(backbone_depths=[1, 1], patch_size=8)  # stem 4 x stage 2 = stride 8, 1x1 projection
    assert model.conformer.embeddings.patch_embeddings.projection.kernel_size == (1, 1)
    assert model(torch.randn(1, 3, 32, 32)).logits.shape == (1, 5)


def test_wrong_number_of_channels_names_expected_and_actual():
    with pytest.raises(ValueError, match=r"\(batch, 3, height, width\), got \(1, 1, 32, 32\)"):
        tiny_conformer()(torch.randn(1, 1, 32, 32))


def test_wrong_image_size_says_what_to_do():
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        tiny_conformer()(torch.randn(1, 3, 40, 40))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("merge_mode", "topk", "merge_mode.*'none', 'bipartite', 'submodular'"),
        ("classifier", "pool", "classifier.*'token', 'gap', 'cnn'"),
        ("merge_r", -1, "merge_r"),
        ("merge_r", [1, 2], "3 layers"),
        ("backbone_depths", [3, 0], "backbone_depths"),
        ("patch_size", 6, "positive int|multiple"),
        ("representation_size", 0, "representation_size"),
    ],
)
def test_bad_config_values_raise_value_error_naming_the_field(field, value, message):
    overrides = {field: value}
    if field == "patch_size":
        overrides["backbone_depths"] = [1, 1]
    with pytest.raises((ValueError, StrictDataclassError), match=message):  # @strict checks the `Literal` choices
        ConformerConfig(**{**TINY, **overrides})


def test_config_accepts_heads_that_do_not_divide_the_width_and_the_model_refuses_them():
    # As transformers' ViTConfig: the config takes hidden_size=37 with 4 heads, the attention module refuses it.
    config = ConformerConfig(**{**TINY, "num_attention_heads": 5})
    with pytest.raises(ValueError, match="divisible"):
        ConformerForImageClassification(config)


def test_merge_mode_tome_is_refused_naming_bipartite_among_the_choices():
    with pytest.raises(StrictDataclassError, match="merge_mode.*'bipartite'.*got tome"):
        ConformerConfig(**TINY, merge_mode="tome")


@pytest.mark.parametrize(
    "override, message",
    [({"merge_r": [1, 2]}, "lists 2 values but the model has 3 layers"), ({"classifier": "bogus"}, "classifier")],
)
def test_from_pretrained_overrides_are_validated_when_the_model_is_built(tmp_path, override, message):
    tiny_conformer().save_pretrained(tmp_path)
    with pytest.raises((ValueError, StrictDataclassError), match=message):
        ConformerForImageClassification.from_pretrained(tmp_path, merge_mode="bipartite", **override)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="ViT-B_16.*R50-ViT-B_16"):
        ConformerConfig.from_preset("ViT-X_99")


def test_merge_schedule_that_cannot_fit_is_refused_at_construction():
    # 16 patches + class token: bipartite can remove at most 8 in the first layer.
    with pytest.raises(ValueError, match="17 tokens"):
        ConformerModel(ConformerConfig(**TINY, merge_mode="bipartite", merge_r=9))


def test_the_readmes_lora_snippet_runs_as_written(tmp_path):
    """The README's PEFT block, run in a folder holding a `runs/demo` Conformer: our module names match, and only the
    adapters and the classifier train."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    blocks = [block.split("```", 1)[0] for block in readme.split("```python\n")[1:]]
    (snippet,) = [block for block in blocks if "get_peft_model" in block]
    tiny_conformer().save_pretrained(tmp_path / "runs" / "demo")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    done = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    trainable = int(done.stdout.split("trainable params: ")[1].split()[0].replace(",", ""))
    # LoRA r=8 on q_proj and v_proj of 3 layers (32 -> 32: 8 x 32 + 32 x 8 each), plus the 5-class classifier
    assert trainable == 3 * 2 * (8 * 32 + 32 * 8) + (32 * 5 + 5)
