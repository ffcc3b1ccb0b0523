"""Calibration cache: activation ranges on real ONNX Runtime from a torch-exported resnet20, the
EntropyCalibration2 text format, and parsing our own cache back (scale == range / 127, float32-exact)."""
import struct
from pathlib import Path

import numpy as np
import pytest

from edgeres.errors import ArtifactError, ConfigError
from edgeres.tensorrt.calib_cache import (
    activation_ranges,
    npz_batches,
    read_calibration_cache,
    scale_hex,
    write_calibration_cache,
)
from edgeres.tensorrt.versions import calib_version_tag

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def resnet20_onnx(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from edgeres.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10).eval()
    with torch.no_grad():  # non-trivial BN statistics so the folded graph is not all zero biases
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    path = tmp_path_factory.mktemp("onnx") / "resnet20_fp32.onnx"
    torch.onnx.export(model, torch.randn(2, 3, 32, 32), str(path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, dynamo=False, opset_version=17)
    return path


@pytest.fixture(scope="module")
def batches():
    rng = np.random.default_rng(0)
    return [rng.standard_normal((4, 3, 32, 32)).astype(np.float32) for _ in range(2)]


def test_hex_format_matches_tensorrt():
    # TensorRT writes the float32 bits big-endian: 1.0 -> 3f800000 (seen in real caches, e.g. `input: 3f800000`)
    assert scale_hex(1.0) == "3f800000"
    assert scale_hex(2.0) == "40000000"
    assert struct.unpack(">f", bytes.fromhex("3c010a14"))[0] == pytest.approx(0.00787, rel=1e-3)


def test_ranges_cover_fp32_onnx_tensor_names(resnet20_onnx, batches):
    import onnx
    import onnxruntime as ort

    ranges = activation_ranges(resnet20_onnx, batches)
    graph = onnx.load(str(resnet20_onnx)).graph
    node_outputs = {o for n in graph.node for o in n.output}
    assert "input" in ranges and "logits" in ranges
    assert all(name == "input" or name in node_outputs for name in ranges)
    assert not any(i.name in ranges for i in graph.initializer)
    assert sum(1 for n in ranges if n.endswith("Relu_output_0")) >= 19  # one per ReLU of resnet20
    # the input's range is exactly max |x| of the calibration images
    assert ranges["input"] == pytest.approx(max(float(np.abs(b).max()) for b in batches), rel=0, abs=0)
    # the logits' range equals what an unmodified ONNX Runtime session produces
    sess = ort.InferenceSession(str(resnet20_onnx), providers=["CPUExecutionProvider"])
    logits = np.concatenate([sess.run(["logits"], {"input": b})[0] for b in batches])
    assert ranges["logits"] == pytest.approx(float(np.abs(logits).max()), rel=1e-5)


def test_cache_round_trip_scale_is_range_over_127(resnet20_onnx, batches, tmp_path):
    ranges = activation_ranges(resnet20_onnx, batches)
    out = tmp_path / "calibration" / "calib.cache"
    info = write_calibration_cache(ranges, out, version_tag=calib_version_tag("8.5.2"))
    lines = out.read_text().splitlines()
    assert lines[0] == "TRT-8502-EntropyCalibration2"
    assert all(len(line.rsplit(": ", 1)[1]) == 8 for line in lines[1:])
    tag, scales = read_calibration_cache(out)
    assert tag == "TRT-8502-EntropyCalibration2"
    assert info["tensors"] == len(scales) == len([v for v in ranges.values() if v > 0])
    for name, scale in scales.items():
        assert np.float32(scale) == np.float32(ranges[name]) / np.float32(127.0), name
    with pytest.raises(ConfigError, match="already exists"):
        write_calibration_cache(ranges, out)


def test_zero_ranges_are_left_out(tmp_path):
    info = write_calibration_cache({"a": 127.0, "dead": 0.0}, tmp_path / "c.cache", version_tag="TRT-100300-"
                                   "EntropyCalibration2")
    assert info["skipped"] == ["dead"]
    assert read_calibration_cache(tmp_path / "c.cache") == ("TRT-100300-EntropyCalibration2", {"a": 1.0})


def test_bad_inputs(tmp_path, resnet20_onnx):
    bad = tmp_path / "bad.cache"
    bad.write_text("hello\n")
    with pytest.raises(ArtifactError, match="no TRT-... header"):
        read_calibration_cache(bad)
    bad.write_text("TRT-8601-EntropyCalibration2\nx: zz\n")
    with pytest.raises(ArtifactError, match="line 2"):
        read_calibration_cache(bad)
    with pytest.raises(ConfigError, match="unknown calibration method"):
        activation_ranges(resnet20_onnx, [], method="entropy")
    with pytest.raises(ConfigError, match="should look like"):
        write_calibration_cache({"a": 1.0}, tmp_path / "x.cache", version_tag="v1")


def test_real_mnist_images_through_npz(tmp_path, resnet20_onnx):
    """Calibrate on real MNIST digits (replicated to 3 channels, padded to 32x32) loaded from an .npz."""
    import gzip

    src = DATA / "mnist" / "t10k-images-idx3-ubyte.gz"
    if not src.is_file():
        pytest.skip(f"real MNIST data not found at {src}")
    raw = gzip.decompress(src.read_bytes())
    imgs = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)[:8].astype(np.float32) / 255.0
    x = np.repeat(np.pad(imgs, ((0, 0), (2, 2), (2, 2)))[:, None], 3, axis=1)
    np.savez(tmp_path / "probe.npz", x=x, y=np.zeros(len(x), np.int64))
    ranges = activation_ranges(resnet20_onnx, npz_batches(tmp_path / "probe.npz", batch_size=4))
    assert ranges["input"] == pytest.approx(float(x.max()))
