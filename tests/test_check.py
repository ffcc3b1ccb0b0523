"""TensorRT Q/DQ rules on hand-built ONNX graphs: each rule can fire, a clean graph passes."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from edgeres.check import check_model, check_onnx
from edgeres.cli import main
from edgeres.errors import ArtifactError

C = 4


def _init(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


def _qdq(prefix, x, *, scale, zp=np.int8(0), axis=None, omit_zp=False):
    """Q + DQ nodes and their initializers; returns (nodes, inits, output name)."""
    inits = [_init(f"{prefix}_s", np.asarray(scale, dtype=np.float32))]
    ins = [x, f"{prefix}_s"]
    if not omit_zp:
        inits.append(_init(f"{prefix}_zp", np.asarray(zp)))
        ins.append(f"{prefix}_zp")
    kw = {} if axis is None else {"axis": axis}
    q = helper.make_node("QuantizeLinear", ins, [f"{prefix}_q"], name=f"{prefix}_Q", **kw)
    dq = helper.make_node("DequantizeLinear", [f"{prefix}_q"] + ins[1:], [f"{prefix}_dq"], name=f"{prefix}_DQ", **kw)
    return [q, dq], inits, f"{prefix}_dq"


def build(*, act_zp=np.int8(0), act_scale=0.1, w_scale=None, w_axis=0, w_zp=None, omit_zp=False,
          qdq_on_branch=False, qdq_on_shortcut=True, custom=False, opset=17):
    """input -> QDQ -> conv1 -> relu -> [QDQ] -> conv2 (+ residual add with the QDQ'd relu output) -> out."""
    nodes, inits = [], []
    n, i, x = _qdq("in", "input", scale=act_scale, zp=act_zp, omit_zp=omit_zp)
    nodes += n
    inits += i
    w = np.random.default_rng(0).standard_normal((C, C, 3, 3)).astype(np.float32)
    for k in (1, 2):
        inits.append(_init(f"w{k}", w))
        n, i, wq = _qdq(f"w{k}", f"w{k}", scale=w_scale if w_scale is not None else np.full(C, 0.01, np.float32),
                        zp=w_zp if w_zp is not None else np.zeros(C, np.int8), axis=w_axis)
        nodes += n
        inits += i
        src = x if k == 1 else "relu1_dq"
        nodes.append(helper.make_node("Conv", [src, wq], [f"conv{k}"], name=f"conv{k}", pads=[1, 1, 1, 1]))
        if k == 1:
            nodes.append(helper.make_node("Relu", ["conv1"], ["relu1"], name="relu1"))
            n, i, _ = _qdq("relu1", "relu1", scale=act_scale)
            nodes += n
            inits += i
    branch = "conv2"
    if qdq_on_branch:
        n, i, branch = _qdq("br", "conv2", scale=act_scale)
        nodes += n
        inits += i
    shortcut = "relu1_dq" if qdq_on_shortcut else "relu1"
    nodes.append(helper.make_node("Add", [branch, shortcut], ["sum"], name="residual_add"))
    out = "sum"
    if custom:
        nodes.append(helper.make_node("FancyOp", ["sum"], ["fancy"], name="fancy", domain="com.example"))
        out = "fancy"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, C, 8, 8])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], initializer=inits)
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("com.example", 1)] if custom else [])
    return helper.make_model(graph, opset_imports=imports)


def rules(model):
    return sorted({v.rule for v in check_model(model)})


def test_clean_graph_passes():
    assert check_model(build()) == []


@pytest.mark.parametrize("kwargs,rule", [
    (dict(act_zp=np.uint8(0)), "int8"),
    (dict(act_zp=np.int8(3)), "zero_point"),
    (dict(omit_zp=True), "zero_point"),
    (dict(w_scale=np.float32(0.01), w_zp=np.int8(0)), "weight_per_channel"),
    (dict(w_axis=1), "weight_per_channel"),
    (dict(w_scale=np.full(C - 1, 0.01, np.float32), w_zp=np.zeros(C - 1, np.int8)), "weight_per_channel"),
    (dict(act_scale=np.full(C, 0.1, np.float32), act_zp=np.zeros(C, np.int8)), "activation_per_tensor"),
    (dict(custom=True), "custom_domain"),
    (dict(qdq_on_branch=True), "residual_add"),
    (dict(qdq_on_shortcut=False), "residual_add"),
    (dict(opset=12), "opset"),
])
def test_each_rule_fires(kwargs, rule):
    assert rule in rules(build(**kwargs))


def test_residual_violation_names_the_add():
    vs = [v for v in check_model(build(qdq_on_branch=True)) if v.rule == "residual_add"]
    assert len(vs) == 1 and vs[0].node == "residual_add" and "conv2" in vs[0].message


def test_not_onnx(tmp_path):
    junk = tmp_path / "model.onnx"
    junk.write_bytes(b"\x00\x01 this is not a protobuf \xff" * 10)
    with pytest.raises(ArtifactError, match="is not an ONNX model"):
        check_onnx(junk)
    with pytest.raises(ArtifactError, match="not found"):
        check_onnx(tmp_path / "missing.onnx")


def test_cli_check(tmp_path):
    good, bad = tmp_path / "good.onnx", tmp_path / "bad.onnx"
    onnx.save(build(), str(good))
    onnx.save(build(qdq_on_branch=True, act_zp=np.uint8(0)), str(bad))
    runner = CliRunner()
    r = runner.invoke(main, ["check", str(good)])
    assert r.exit_code == 0 and "ok" in r.output
    r = runner.invoke(main, ["check", str(bad)])
    assert r.exit_code == 1 and "residual_add" in r.output and "[int8]" in r.output
    r = runner.invoke(main, ["check", "--json", str(bad)])
    obj = json.loads(r.output)
    assert r.exit_code == 1 and not obj["ok"] and {"rule", "node", "message"} <= set(obj["violations"][0])
    (tmp_path / "x.onnx").write_text("hello")
    r = runner.invoke(main, ["check", str(tmp_path / "x.onnx")])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "not an ONNX model" in r.output
    r = runner.invoke(main, ["check", "--help"])
    assert r.exit_code == 0 and "TensorRT" in r.output


def test_int8_weight_constants_feeding_dequantize_are_checked_like_qdq_weights():
    """The stored-INT8-weights form (INT8 initializer -> DequantizeLinear -> Conv) passes with per-channel axis-0
    scales and is flagged with a per-tensor scale, as the Q/DQ form is."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from edgeres.check import check_model

    def model(scale):
        inits = [numpy_helper.from_array(np.ones((4, 3, 3, 3), np.int8), "w_q"),
                 numpy_helper.from_array(np.asarray(scale, np.float32), "w_s"),
                 numpy_helper.from_array(np.zeros(np.asarray(scale).shape, np.int8), "w_z"),
                 numpy_helper.from_array(np.array(0.1, np.float32), "a_s"),
                 numpy_helper.from_array(np.array(0, np.int8), "a_z")]
        nodes = [helper.make_node("QuantizeLinear", ["input", "a_s", "a_z"], ["q"]),
                 helper.make_node("DequantizeLinear", ["q", "a_s", "a_z"], ["dq"]),
                 helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w"], axis=0),
                 helper.make_node("Conv", ["dq", "w"], ["logits"])]
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4, 6, 6])], inits)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])

    assert check_model(model([0.1, 0.2, 0.3, 0.4])) == []
    rules = {v.rule for v in check_model(model(0.1))}
    assert any("channel" in r for r in rules), rules


def test_weight_form_accepted_only_where_nvidia_documents_it(tmp_path):
    """INT8 constants into DequantizeLinear: documented from TensorRT 10; 8.5/8.6 document FP32 weights behind
    QuantizeLinear (versions.SOURCES["int8_weight_forms"]). Without a version the form is not judged."""
    from test_tensorrt_plan import qdq_onnx

    from edgeres.check import Rule, check_onnx

    int8 = qdq_onnx(tmp_path / "i.onnx", int8_weights=True)
    fp32w = qdq_onnx(tmp_path / "f.onnx", int8_weights=False)
    form = Rule.WEIGHT_FORM.value
    assert form in {v.rule for v in check_onnx(int8, trt_version="8.5.2")}
    assert form in {v.rule for v in check_onnx(int8, trt_version="8.6")}
    assert form not in {v.rule for v in check_onnx(int8, trt_version="10.3")}
    assert form not in {v.rule for v in check_onnx(int8)}
    for v in ("8.5.2", "8.6", "10.3", "11.0"):
        assert form not in {x.rule for x in check_onnx(fp32w, trt_version=v)}


def test_external_data_is_read_only_from_beside_the_model(tmp_path):
    """Weights in an external file load relative to the model's folder; a location outside it is refused in one
    line (it raised onnx's ValidationError with a traceback), and a missing file says so."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgeres.check import load_onnx
    from edgeres.errors import ArtifactError

    (tmp_path / "m").mkdir()
    w = numpy_helper.from_array(np.full((4, 4), 2.0, np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    path = tmp_path / "m" / "model.onnx"
    onnx.save_model(helper.make_model(g), str(path), save_as_external_data=True, location="w.bin",
                    size_threshold=0)
    model = load_onnx(path)
    assert numpy_helper.to_array(model.graph.initializer[0]).sum() == 32.0
    m = onnx.load(str(path), load_external_data=False)
    m.graph.initializer[0].external_data[0].value = "../w.bin"
    onnx.save_model(m, str(tmp_path / "m" / "escape.onnx"))
    with pytest.raises(ArtifactError, match="lies outside the model's folder"):
        load_onnx(tmp_path / "m" / "escape.onnx")
    (tmp_path / "m" / "w.bin").unlink()
    with pytest.raises(ArtifactError, match="external data w.bin is missing"):
        load_onnx(path)
