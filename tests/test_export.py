"""Every merge mode runs as one graph: `torch.compile(fullgraph=True)`, `torch.export` and ONNX (dynamo exporter, run by
onnxruntime) give the eager model's logits, with a per-layer merge schedule and odd token counts, and with ATC's staged
schedule beside two register tokens that never merge.

Compiling is slow on a CPU, so each mode's model is built and exported once (module-scoped fixtures) and every test
reads the shared artefacts."""

import pytest
import torch

from configuration_conformer import ConformerConfig
from conformer_vit.hub_folder import export_onnx
from modeling_conformer import ConformerForImageClassification
from token_merging import MATCHING_FUNCTIONS

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

# 40 px, patch 8: 26 tokens, then 19 (odd) after layer 0, 19, 15.
TINY = dict(
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=64,
    image_size=40,
    patch_size=8,
    num_labels=5,
)
SCHEDULES = {  # schedule -> its config fields and the tokens entering each layer, then the final tokens
    "per-layer r": (dict(merge_r=[7, 0, 4]), [26, 19, 19, 15]),
    # 1 + 2 registers + 25 patches; layer 0 keeps 60% of 25 patches (r=10), layer 2 60% of 15 (r=6)
    "staged": (dict(merge_layers=[0, 2], merge_keep_rate=0.6, num_register_tokens=2), [28, 18, 18, 12]),
}
ATOL = 1e-4


@pytest.fixture(
    scope="module", params=[(mode, schedule) for mode in sorted(MATCHING_FUNCTIONS) for schedule in SCHEDULES]
)
def exported(request, tmp_path_factory):
    """One model per merge mode and schedule, exported once: (model, its ExportedProgram, the ONNX file's path, the
    tokens of each layer)."""
    mode, schedule = request.param
    fields, tokens = SCHEDULES[schedule]
    torch.manual_seed(0)
    model = ConformerForImageClassification(ConformerConfig(**TINY, **fields, merge_mode=mode)).eval()
    path = tmp_path_factory.mktemp(mode) / "model.onnx"
    export_onnx(model, path)  # the users' export path (`convert_npz_to_hf.py --export_onnx`), checked there too
    example = torch.zeros(2, 3, 40, 40)
    program = torch.export.export(model, (example,), dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch")}})
    return model, program, path, tokens


def eager_logits(model, pixel_values):
    with torch.no_grad():
        return model(pixel_values).logits


def test_merging_really_happens_in_the_exported_models(exported):
    model, _, _, tokens = exported
    outputs = model(torch.randn(2, 3, 40, 40), output_hidden_states=True, output_merge_info=True)
    assert [h.shape[1] for h in outputs.hidden_states] == tokens
    prefix = model.config.num_prefix_tokens  # the class token and the registers: never merged, never absorbing
    assert torch.equal(outputs.token_sizes[:, :prefix], torch.ones(2, prefix))


def test_torch_compile_fullgraph_equals_eager(exported):
    """`fullgraph=True` fails on any graph break (a Python branch on a tensor, `.item()`, a data-dependent shape).
    The aot_eager backend traces exactly what inductor compiles (dynamo, then AOT autograd's functional graph) and
    runs it without the minutes of C++ code generation inductor needs on a CPU."""
    model, _, _, _ = exported
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    pixel_values = torch.randn(3, 3, 40, 40)
    with torch.no_grad():
        logits = compiled(pixel_values).logits
    assert torch.allclose(logits, eager_logits(model, pixel_values), atol=ATOL)


def test_torch_export_equals_eager_for_any_batch(exported):
    model, program, _, _ = exported
    for batch in (3, 5):
        pixel_values = torch.randn(batch, 3, 40, 40)
        with torch.no_grad():
            logits = program.module()(pixel_values).logits
        assert torch.allclose(logits, eager_logits(model, pixel_values), atol=ATOL)


def test_onnx_has_named_inputs_and_outputs_and_a_dynamic_batch(exported):
    _, _, path, _ = exported
    graph = onnx.load(str(path)).graph
    assert [value.name for value in graph.input] == ["pixel_values"]
    assert [value.name for value in graph.output] == ["logits"]
    pixel_dims = graph.input[0].type.tensor_type.shape.dim
    logit_dims = graph.output[0].type.tensor_type.shape.dim
    assert pixel_dims[0].dim_param and not pixel_dims[0].HasField("dim_value")  # symbolic, not a fixed number
    assert logit_dims[0].dim_param == pixel_dims[0].dim_param
    assert [d.dim_value for d in pixel_dims[1:]] == [3, 40, 40] and logit_dims[1].dim_value == 5


def test_onnxruntime_equals_eager(exported):
    model, _, path, _ = exported
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 4):
        pixel_values = torch.randn(batch, 3, 40, 40)
        (logits,) = session.run(["logits"], {"pixel_values": pixel_values.numpy()})
        assert torch.allclose(torch.from_numpy(logits), eager_logits(model, pixel_values), atol=ATOL)
