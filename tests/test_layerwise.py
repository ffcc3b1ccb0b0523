"""`edgeres compare --layers`: the INT8 ONNX against its fake-quant model, activation quantizer by quantizer."""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper
from torch.utils.data import TensorDataset

os.environ.setdefault("NNCF_CI", "1")
pytest.importorskip("nncf", reason="NNCF (edgeres[quant]) is not installed")

from edgeres.checkpoint import ModelMeta  # noqa: E402
from edgeres.cli import main  # noqa: E402
from edgeres.export import export_onnx  # noqa: E402
from edgeres.fold import fold_batchnorm  # noqa: E402
from edgeres.models import create_model  # noqa: E402
from edgeres.quantize import quantize_ptq, save_quantized  # noqa: E402
from edgeres.verify import layerwise  # noqa: E402

META = ModelMeta(arch="resnet20", num_classes=10, in_channels=3, input_size=32, mean=(0.5,) * 3, std=(0.25,) * 3)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("layers")
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10).eval()
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    x = torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    q = quantize_ptq(fold_batchnorm(model).model, TensorDataset(x, torch.zeros(48, dtype=torch.long)),
                     subset_size=48, batch_size=16).model
    save_quantized(tmp / "int8.pt", q, META)
    export_onnx(q, tmp / "int8.onnx", meta=META, int8=True)
    np.savez(tmp / "probe.npz", x=x[:8].numpy())
    return tmp, q, x[:8].numpy()


def _activation_q_nodes(path):
    proto = onnx.load(str(path))
    weights = {i.name for i in proto.graph.initializer}
    return proto, [n for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in weights]


def test_every_activation_quantizer_matches_its_qdq_up_to_rounding(exported):
    tmp, q, x = exported
    rows = layerwise(q, tmp / "int8.onnx", x)
    _, acts = _activation_q_nodes(tmp / "int8.onnx")
    assert len(rows) == len(acts) > 10
    assert rows[0]["quantizer"].startswith("x__") and rows[0]["differ_pct"] == 0.0   # the input: same numbers in
    # a correct export differs only by float rounding at step boundaries: one step, on a small share of elements
    # (random weights make this small net chaotic: the flips multiply layer by layer, so only the first layers are
    # held to one step)
    assert all(r["max_steps"] <= 1.0 and r["differ_pct"] < 0.1 for r in rows[:4]), rows[:4]


def test_a_wrong_scale_shows_at_its_quantizer(exported, tmp_path):
    tmp, q, x = exported
    proto, acts = _activation_q_nodes(tmp / "int8.onnx")
    victim = acts[3]
    consts = {n.output[0]: n for n in proto.graph.node if n.op_type == "Constant"}
    inits = {i.name: i for i in proto.graph.initializer}
    tensor = inits[victim.input[1]] if victim.input[1] in inits else consts[victim.input[1]].attribute[0].t
    tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) / 4, tensor.name))  # a range 4x too small
    onnx.save(proto, str(tmp_path / "bad.onnx"))
    rows = layerwise(q, tmp_path / "bad.onnx", x)
    first_bad = next(r for r in rows if r["max_steps"] > 4.0)
    assert victim.name.endswith(f"/{first_bad['quantizer']}/QuantizeLinear"), (victim.name, first_bad)
    assert first_bad["max_steps"] > 20 and first_bad["differ_pct"] > 1.0


def test_cli_compare_layers(exported):
    tmp, _, _ = exported
    r = CliRunner().invoke(main, ["compare", str(tmp / "int8.pt"), str(tmp / "int8.onnx"), "--layers", "--json"])
    assert r.exit_code == 0, r.output
    obj = json.loads(r.output)
    assert obj["samples"] == 8 and obj["layers"][0]["differ_pct"] == 0.0
    r = CliRunner().invoke(main, ["compare", str(tmp / "int8.onnx"), str(tmp / "int8.onnx"), "--layers"])
    assert r.exit_code == 1 and "not a readable PyTorch checkpoint" in r.output and r.output.count("\n") == 1
    r = CliRunner().invoke(main, ["compare", str(tmp / "int8.pt"), str(tmp / "int8.onnx")])
    assert r.exit_code == 0 and "int8 (fake-quant)" in r.output
