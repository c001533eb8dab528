"""Every kind of Hub folder the project writes (converted, trained, saved) carries the three remote-code files and
loads with `trust_remote_code=True` in a fresh process, from another directory, giving the outputs it gave here."""

import json
import os
import subprocess
import sys

import torch

import convert_npz_to_hf as converter
import run_image_classification as training
from configuration_conformer import ConformerConfig
from conformer_vit.hub_folder import remote_code_files
from modeling_conformer import ConformerForImageClassification

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16)


def test_converted_trained_and_saved_folders_load_in_a_fresh_process_with_token_merging(tmp_path, google_npz):
    assert remote_code_files() == ("configuration_conformer.py", "modeling_conformer.py", "token_merging.py")
    folders = {"converted": tmp_path / "converted", "trained": tmp_path / "trained", "saved": tmp_path / "saved"}
    converter.convert(google_npz(tmp_path / "tiny.npz"), folders["converted"], merge_mode="ward", merge_r=2)
    quick = ["--max_steps", "2", "--eval_steps", "2", "--per_device_train_batch_size", "8", "--total_batch_size", "8"]
    quick += ["--use_cpu", "--report_to", "none", "--disable_tqdm", "True", "--max_train_samples", "16"]
    quick += ["--max_eval_samples", "8", "--patch_size", "4", "--image_size", "16", "--merge_mode", "bipartite"]
    quick += ["--merge_r", "2", "--config_overrides", "hidden_size=32,num_hidden_layers=2,num_attention_heads=2"]
    assert training.main(["--output_dir", str(folders["trained"]), "--model_type", "ViT-Ti_16", *quick]) == 0
    config = ConformerConfig(**TINY, patch_size=4, merge_mode="submodular", merge_r=3, num_labels=3)
    ConformerForImageClassification(config).save_pretrained(folders["saved"])

    expected = {}
    for kind, folder in folders.items():
        assert set(remote_code_files()) <= {path.name for path in folder.iterdir()}, kind
        model = ConformerForImageClassification.from_pretrained(folder).eval()
        pixels = torch.rand(2, 3, model.config.image_size, model.config.image_size, generator=torch.manual_seed(0))
        torch.save(pixels, tmp_path / f"{kind}.pt")
        with torch.no_grad():
            expected[kind] = model(pixels).logits.tolist()
    script = f"""
import json, torch
from transformers import AutoModelForImageClassification
folders, expected = {json.dumps({k: str(v) for k, v in folders.items()})}, {json.dumps(expected)}
for kind, folder in folders.items():
    model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    pixels = torch.load({str(tmp_path)!r} + f"/{{kind}}.pt", weights_only=True)
    with torch.no_grad():
        print(kind, (model(pixels).logits - torch.tensor(expected[kind])).abs().max().item())
"""
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    done = subprocess.run([sys.executable, "-c", script], cwd=workdir, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    differences = dict(line.split() for line in done.stdout.strip().splitlines())
    assert set(differences) == set(folders) and all(float(value) < 1e-5 for value in differences.values())
