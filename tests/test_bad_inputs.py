"""Bad input over every command, as a careful user would try it: each case must exit non-zero with one `Error:`
line (no traceback, no "internal error"), and every file that existed before must be byte-identical afterwards.

The artifacts are real: one small `edgeres build --int8` on the embedded digits, made once for the module.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeres.cli import main

pytestmark = pytest.mark.slow


def _snapshot(root: Path) -> dict[str, str]:
    """Every path under root and what it is: a file's sha256, a link's target, a FIFO, a folder (a folder or a
    special file replaced or deleted shows as a change, not only a file's bytes)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.name == ".lock":
            continue
        if p.is_symlink():
            out[str(p.relative_to(root))] = "link:" + os.readlink(p)
        elif p.is_fifo():
            out[str(p.relative_to(root))] = "fifo"
        elif p.is_dir():
            out[str(p.relative_to(root))] = "dir"
        elif p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A real small run plus the broken files a user might hand over."""
    root = tmp_path_factory.mktemp("bad")
    run = root / "run"
    r = CliRunner().invoke(main, ["build", "--int8", "--arch", "mnist_resnet", "--epochs", "3", "--qat-epochs", "0",
                                  "--bench-seconds", "0", "--max-drop", "100", "--quiet", "--out", str(run)])
    assert r.exit_code == 0, r.output
    (root / "garbage.pt").write_bytes(os.urandom(4096))
    (root / "garbage.onnx").write_bytes(os.urandom(4096))
    (root / "garbage.npz").write_bytes(b"PK\x03\x04 not really a zip")
    (root / "garbage.xml").write_bytes(os.urandom(2048))
    (root / "empty.xml").write_bytes(b"")
    (root / "lonely.xml").write_text('<?xml version="1.0"?>\n<net name="m" version="11"></net>\n')
    np_bad = root / "wrong_key.npz"
    import numpy as np

    np.savez(np_bad, images=np.zeros((2, 3), np.float32))
    (root / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (root / "hosts_latin1.txt").write_bytes("nvidia@jétson\n".encode("latin-1"))
    (root / "known_hosts_garbage").write_bytes(b"\x00\xff garbage |1|x|y ssh-ed25519 AAAA!!!\n")
    (root / "a_file").write_text("I am a file\n")
    (root / "existing.pt").write_text("keep me\n")
    (root / "existing.onnx").write_text("keep me\n")
    (root / "existing.cache").write_text("keep me\n")
    (root / "existing_dir").mkdir()
    (root / "existing_dir" / "keep.txt").write_text("keep me\n")
    garbage_run = root / "garbage_run"
    garbage_run.mkdir()
    (garbage_run / "stages.jsonl").write_bytes(b"\xff\xfe[1,2,3]\n{not json\n[\"a\"]\n")
    one = root / "oneclass"
    for split in ("train", "val"):
        (one / split / "cat").mkdir(parents=True)
        from PIL import Image

        for i in range(3):
            Image.new("RGB", (40, 40), (i * 40, 10, 10)).save(one / split / "cat" / f"{i}.png")
    (root / "planned.plan.trtexec.sh").write_text("#!/bin/sh\necho keep me\n")
    ro = _read_only_dir(root)
    _ownership_files(root)
    _special_files(root)
    _bombs(root)
    _bad_numbers(root, run)
    _bad_runner_models(root)
    yield {"root": root, "run": run, "ck": run / "train" / "best.pt", "folded": run / "fold" / "folded.pt",
           "ptq": run / "quant" / "ptq.pt", "onnx": run / "export" / "model_fp32.onnx",
           "onnx8": run / "export" / "model_int8.onnx", "probe": run / "probe.npz", "ro": ro,
           "notdir": root / "a_file" / "sub", "plan": root / "planned.plan",
           "garbage_run": garbage_run, "oneclass": one}
    if ro.name == "readonly" and os.geteuid() == 0:   # our bind mount (Path.is_mount misses bind mounts)
        subprocess.run(["umount", str(ro)], capture_output=True)


def _ownership_files(root: Path) -> None:
    """Folders and files edgeres did not make, which no --out (with or without --force) may replace or delete."""
    (root / "user_folder").mkdir()
    (root / "user_folder" / "recipe.yaml").write_text("my own notes\n")
    (root / "user_train").mkdir()
    (root / "user_train" / "best.pt").write_text("my own model\n")
    (root / "user_train" / "metrics.csv").write_text("my,own,numbers\n")
    (root / "link.pt").symlink_to(root / "a_file")
    # an experiment folder edgeres made (its marker records curves.json) where the user put their own figure
    import json

    exp = root / "exp_own"
    exp.mkdir()
    (exp / "curves.json").write_text("{}\n")
    (exp / "degradation.png").write_bytes(b"my own figure")
    (exp / ".edgeres").write_text(json.dumps({"created_by": "edgeres", "kind": "experiment", "files": {
        "curves.json": hashlib.sha256(b"{}\n").hexdigest()}}))
    # a training folder edgeres made whose best.pt the user linked to their own file
    (root / "train_link").mkdir()
    (root / "train_link" / ".edgeres").write_text('{"created_by": "edgeres", "kind": "train"}')
    (root / "train_link" / "best.pt").symlink_to(root / "a_file")


def _special_files(root: Path) -> None:
    """FIFOs where a regular file is expected: opening one for reading blocks until a writer comes (forever)."""
    for name in ("fifo.onnx", "fifo.pt", "fifo.yaml", "fifo.png", "fifo.npz", "fifo_bundle.tar.gz"):
        os.mkfifo(root / name)
    (root / "fifo_run").mkdir()
    os.mkfifo(root / "fifo_run" / "stages.jsonl")


def _png_header(path: Path, width: int, height: int) -> None:
    """A PNG that declares width x height pixels in a few bytes (a decompression bomb's header)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b""))


def _bombs(root: Path) -> None:
    import io
    import zipfile

    import numpy as np
    from PIL import Image

    _png_header(root / "bomb.png", 30000, 30000)                    # past PIL's own limit: DecompressionBombError
    Image.new("L", (8200, 8200)).save(root / "big.png")             # 67 Mpx, a valid image: past edgeres's 64 Mpx,
    Image.new("L", (32, 32), 128).save(root / "img.png")            # under PIL's own warning (89 Mpx)
    levels = "    a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"    {chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(9))
    (root / "laughs.yaml").write_text("model:\n  options:\n" + levels)   # 10**10 nodes once expanded, in a place
    # a recipe accepts (arch options are a free mapping)
    (root / "deep.yaml").write_text("model:\n  options:\n    x: " + "[" * 5000 + "]" * 5000 + "\n")
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                  "shape": (100000, 3, 224, 224)})
    with zipfile.ZipFile(root / "bomb.npz", "w") as zf:          # declares 56 GiB, holds none of it
        zf.writestr("x.npy", header.getvalue())


def _bad_numbers(root: Path, run: Path) -> None:
    """Non-finite values and metadata of the wrong type or size, in files a user hands over."""
    import torch

    (root / "nan.yaml").write_text("train:\n  lr: .nan\n")
    ck = torch.load(run / "train" / "best.pt", weights_only=True)
    for name, key, value in (("big_input", "input_size", 50000), ("many_classes", "num_classes", 10**9),
                             ("abc_size", "input_size", "abc"), ("two_means", "mean", [0.1, 0.2]),
                             ("nan_std", "std", [float("nan")])):
        torch.save({**ck, "meta": {**ck["meta"], key: value}}, root / f"{name}.pt")
    torch.save({**ck, "state_dict": {**ck["state_dict"], 7: torch.zeros(1)}}, root / "intkeys.pt")
    # metadata that disagrees with the model, weights that are not numbers
    torch.save({**ck, "meta": {**ck["meta"], "class_names": ["a", "b", "c"]}}, root / "few_names.pt")
    name = next(k for k, v in ck["state_dict"].items() if v.is_floating_point() and v.ndim == 4)
    broken = ck["state_dict"][name].clone()
    broken.view(-1)[0] = float("nan")
    torch.save({**ck, "state_dict": {**ck["state_dict"], name: broken}}, root / "nan_weights.pt")
    (root / "nan_weights.name").write_text(name)
    (root / "garbage.cache").write_bytes(os.urandom(512))
    import numpy as np

    with np.load(run / "probe.npz") as z:
        x = z["x"]
    np.savez(root / "labels_10.npz", x=x, y=np.full(len(x), 10, np.int64))      # 10 classes: 0..9
    np.savez(root / "labels_negative.npz", x=x, y=np.full(len(x), -1, np.int64))


def _bad_runner_models(root: Path) -> None:
    """ONNX models ONNX Runtime loads but edgeres cannot use as classifiers, or that fail when run."""
    import onnx
    from onnx import TensorProto, helper

    def save(name, nodes, inputs, outputs, inits=()):
        graph = helper.make_graph(nodes, name, inputs, outputs, initializer=list(inits))
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(root / name))

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 32, 32])
    w = helper.make_tensor("w", TensorProto.FLOAT, [10], [0.1] * 10)
    del w.dims[:]
    w.dims.extend([4, 1, 3, 3])   # declares 36 values, holds 10
    save("bad_initializer.onnx", [helper.make_node("Conv", ["input", "w"], ["logits"])], [x],
         [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4, 30, 30])], [w])
    save("argmax.onnx", [helper.make_node("Flatten", ["input"], ["f"]),
                         helper.make_node("ArgMax", ["f"], ["logits"], axis=1, keepdims=0)],
         [x], [helper.make_tensor_value_info("logits", TensorProto.INT64, ["N"])])
    y = helper.make_tensor_value_info("other", TensorProto.FLOAT, ["N", 1, 32, 32])
    save("two_inputs.onnx", [helper.make_node("Add", ["input", "other"], ["s"]),
                             helper.make_node("Flatten", ["s"], ["logits"])],
         [x, y], [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1024])])
    dyn = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", "C", "H", "W"])
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 1, 3, 3], [0.1] * 36)
    save("dynamic.onnx", [helper.make_node("Conv", ["input", "w"], ["c"]),
                          helper.make_node("GlobalAveragePool", ["c"], ["p"]),
                          helper.make_node("Flatten", ["p"], ["logits"])],
         [dyn], [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], [w])


def _read_only_dir(root: Path) -> Path:
    """A folder nobody can write to. As root (CI), permissions do not stop writes: a read-only bind mount does;
    where that is not allowed either, a path under a regular file (ENOTDIR) stands in."""
    ro = root / "readonly"
    ro.mkdir()
    (ro / "inside.txt").write_text("keep me\n")
    ro.chmod(0o555)
    if os.geteuid() != 0:
        return ro
    ok = subprocess.run(["mount", "--bind", str(ro), str(ro)], capture_output=True).returncode == 0 and \
        subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], capture_output=True).returncode == 0
    if not ok:
        subprocess.run(["umount", str(ro)], capture_output=True)
        return root / "a_file" / "sub"
    return ro


TINY_EXPERIMENT = ["experiment", "degradation", "--dataset", "digits", "--depths", "8,14", "--iterations", "2",
                   "--eval-every", "1", "--test-images", "16", "--batch-size", "16", "--threads", "1"]   # a valid one

# (id, argv with {placeholders}) -- every case must be refused
CASES = [
    # weights
    ("weights-import-garbage", ["weights", "import", "--from", "{root}/garbage.pt"]),
    ("weights-fetch-unknown-arch", ["weights", "fetch", "resnet-18"]),
    # fold
    ("fold-missing-weights", ["fold", "--weights", "{root}/nope.pt", "--out", "{root}/f.pt"]),
    ("fold-garbage-weights", ["fold", "--weights", "{root}/garbage.pt", "--out", "{root}/f.pt"]),
    ("fold-readonly-out", ["fold", "--weights", "{ck}", "--out", "{ro}/f.pt"]),
    ("fold-out-under-file", ["fold", "--weights", "{ck}", "--out", "{notdir}/f.pt"]),
    ("fold-out-exists", ["fold", "--weights", "{ck}", "--out", "{root}/existing.pt"]),
    ("fold-out-is-folder", ["fold", "--weights", "{ck}", "--out", "{root}/existing_dir", "--force"]),
    ("fold-bogus-arch", ["fold", "--weights", "{ck}", "--arch", "resnet9000", "--out", "{root}/f.pt"]),
    # quantize
    ("quantize-no-mode", ["quantize", "--weights", "{folded}", "--dataset", "digits", "--out", "{root}/q.pt"]),
    ("quantize-ptq-and-qat", ["quantize", "--ptq", "--qat", "--weights", "{folded}", "--dataset", "digits",
                              "--out", "{root}/q.pt"]),
    ("quantize-ptq-of-int8", ["quantize", "--ptq", "--weights", "{ptq}", "--dataset", "digits",
                              "--out", "{root}/q.pt"]),
    ("quantize-unknown-dataset", ["quantize", "--ptq", "--weights", "{folded}", "--dataset", "imagenet21k",
                                  "--out", "{root}/q.pt"]),
    ("quantize-calib-too-large", ["quantize", "--ptq", "--weights", "{folded}", "--dataset", "digits",
                                  "--calib-size", "100000", "--out", "{root}/q.pt"]),
    ("quantize-readonly-out", ["quantize", "--ptq", "--weights", "{folded}", "--dataset", "digits",
                               "--out", "{ro}/q.pt"]),
    # export / check
    ("export-opset-99", ["export", "--weights", "{folded}", "--opset", "99", "--out", "{root}/m.onnx"]),
    ("export-int8-of-fp32", ["export", "--weights", "{folded}", "--int8", "--out", "{root}/m.onnx"]),
    ("export-readonly-out", ["export", "--weights", "{folded}", "--out", "{ro}/m.onnx"]),
    ("export-out-exists", ["export", "--weights", "{folded}", "--out", "{root}/existing.onnx"]),
    ("export-garbage-weights", ["export", "--weights", "{root}/garbage.pt", "--out", "{root}/m.onnx"]),
    ("check-missing", ["check", "{root}/nope.onnx"]),
    ("check-garbage", ["check", "{root}/garbage.onnx"]),
    # build
    ("build-readonly-out", ["build", "--out", "{ro}/run", "--epochs", "1"]),
    ("build-out-is-file", ["build", "--out", "{root}/a_file", "--epochs", "1"]),
    ("build-binary-recipe", ["build", "--recipe", "{root}/binary.yaml", "--out", "{root}/b"]),
    ("build-missing-recipe", ["build", "--recipe", "{root}/nope.yaml", "--out", "{root}/b"]),
    ("build-bogus-arch-into-good-run", ["build", "--arch", "resnet9000", "--out", "{run}"]),
    ("build-missing-data-into-good-run", ["build", "--dataset", "mnist", "--data-dir", "{root}/nope",
                                          "--out", "{run}"]),
    ("build-missing-pretrained", ["build", "--pretrained", "{root}/nope.pt", "--out", "{run}"]),
    ("build-negative-max-drop", ["build", "--max-drop", "-1", "--out", "{run}"]),
    ("build-one-class-imagefolder", ["build", "--dataset", "imagefolder", "--data-dir", "{oneclass}",
                                     "--out", "{root}/b1"]),
    # report
    ("report-missing", ["report", "{root}/nope"]),
    ("report-garbage-stages", ["report", "{garbage_run}"]),
    ("report-readonly-run", ["report", "{ro}"]),
    # bench / compare
    ("bench-missing", ["bench", "--engine", "{root}/nope.onnx"]),
    ("bench-garbage-onnx", ["bench", "--engine", "{root}/garbage.onnx", "--iterations", "1"]),
    ("bench-garbage-ir", ["bench", "--engine", "{root}/garbage.xml", "--iterations", "1"]),
    ("bench-empty-ir", ["bench", "--engine", "{root}/empty.xml", "--iterations", "1"]),
    ("bench-ir-without-bin", ["bench", "--engine", "{root}/lonely.xml", "--iterations", "1"]),
    ("bench-garbage-onnx-on-openvino", ["bench", "--engine", "{root}/garbage.onnx", "--backend", "openvino",
                                        "--iterations", "1"]),
    ("bench-huge-batch", ["bench", "--engine", "{onnx}", "--batch", "100000000", "--iterations", "1"]),
    ("bench-zero-batch", ["bench", "--engine", "{onnx}", "--batch", "0", "--iterations", "1"]),
    ("bench-bogus-device", ["bench", "--engine", "{ck}", "--device", "bogus", "--iterations", "1"]),
    ("compare-missing", ["compare", "{onnx}", "{root}/nope.onnx", "--probe", "{probe}"]),
    ("compare-garbage-probe", ["compare", "{onnx}", "{onnx8}", "--probe", "{root}/garbage.npz"]),
    ("compare-probe-wrong-key", ["compare", "{onnx}", "{onnx8}", "--probe", "{root}/wrong_key.npz"]),
    ("predict-missing-model", ["predict", "{root}/nope.onnx", "{root}/a_file"]),
    ("predict-garbage-model", ["predict", "{root}/garbage.onnx", "{root}/a_file"]),
    ("predict-not-an-image", ["predict", "{onnx}", "{root}/a_file"]),
    ("predict-csv-and-json", ["predict", "{onnx}", "{root}/a_file", "--csv", "--json"]),
    # TensorRT planning (no TensorRT here)
    ("calib-cache-garbage-onnx", ["calib-cache", "--onnx", "{root}/garbage.onnx", "--images", "{probe}",
                                  "--out", "{root}/c.cache"]),
    ("calib-cache-bad-npz", ["calib-cache", "--onnx", "{onnx}", "--images", "{root}/garbage.npz",
                             "--out", "{root}/c.cache"]),
    ("calib-cache-count-too-large", ["calib-cache", "--onnx", "{onnx}", "--images", "{probe}", "--count", "100000",
                                     "--out", "{root}/c.cache"]),
    ("calib-cache-readonly-out", ["calib-cache", "--onnx", "{onnx}", "--images", "{probe}", "--out", "{ro}/c.cache"]),
    ("calib-cache-out-exists", ["calib-cache", "--onnx", "{onnx}", "--images", "{probe}",
                                "--out", "{root}/existing.cache"]),
    ("compile-plan-exists", ["compile", "--onnx", "{onnx8}", "--out", "{plan}", "--int8", "--trt-version", "10.3"]),
    ("compile-garbage-onnx", ["compile", "--onnx", "{root}/garbage.onnx", "--out", "{root}/g.plan", "--int8",
                              "--trt-version", "10.3"]),
    ("compile-unknown-version", ["compile", "--onnx", "{onnx8}", "--out", "{root}/v.plan", "--trt-version", "7.0"]),
    ("compile-readonly-out", ["compile", "--onnx", "{onnx8}", "--out", "{ro}/m.plan", "--int8",
                              "--trt-version", "10.3"]),
    # bundle / deploy
    ("bundle-missing-run", ["bundle", "{root}/nope", "--out", "{root}/dist"]),
    ("bundle-garbage-run", ["bundle", "{garbage_run}", "--out", "{root}/dist"]),
    ("bundle-probe-too-large", ["bundle", "{run}", "--out", "{root}/dist", "--probe-size", "100000"]),
    ("bundle-readonly-out", ["bundle", "{run}", "--out", "{ro}/dist"]),
    ("bundle-out-exists", ["bundle", "{run}", "--out", "{root}/existing_dir"]),
    ("rootfs-missing-bundle", ["rootfs", "--bundle", "{root}/nope", "--rootfs", "{root}/existing_dir"]),
    ("rootfs-garbage-bundle", ["rootfs", "--bundle", "{garbage_run}", "--rootfs", "{root}/existing_dir"]),
    ("fleet-ansible-missing-bundle", ["fleet", "ansible", "{root}/nope", "--out", "{root}/ansible",
                                     "--host", "nvidia@jetson1"]),
    ("deploy-option-as-host", ["deploy", "{run}", "--host", "-oProxyCommand=touch /tmp/pwned"]),
    ("deploy-non-ascii-host", ["deploy", "{run}", "--host", "nvidia@jétson"]),
    ("deploy-non-utf8-hosts-file", ["deploy", "{run}", "--hosts-file", "{root}/hosts_latin1.txt"]),
    ("deploy-garbage-known-hosts", ["deploy", "{run}", "--host", "nvidia@127.0.0.1:1",
                                    "--known-hosts", "{root}/known_hosts_garbage"]),
    ("deploy-missing-bundle", ["deploy", "{root}/nope", "--host", "nvidia@127.0.0.1:1"]),
    ("status-option-as-host", ["status", "--host", "-oProxyCommand=touch /tmp/pwned"]),
    ("status-no-hosts", ["status"]),
    ("rollback-garbage-known-hosts", ["rollback", "--host", "jetson1", "--known-hosts", "{root}/known_hosts_garbage"]),
    ("rollback-non-utf8-hosts-file", ["rollback", "--hosts-file", "{root}/hosts_latin1.txt"]),
    # train / eval / zoo / experiment
    ("train-readonly-out", ["train", "--out", "{ro}/t", "--epochs", "1"]),
    ("train-binary-recipe", ["train", "--recipe", "{root}/binary.yaml", "--out", "{root}/t"]),
    ("train-resume-nothing", ["train", "--resume", "--out", "{root}/t_none"]),
    ("train-existing-run", ["train", "--out", "{run}/train", "--epochs", "1"]),
    ("eval-garbage-weights", ["eval", "--weights", "{root}/garbage.pt", "--dataset", "digits"]),
    ("eval-missing-data", ["eval", "--weights", "{ck}", "--dataset", "mnist", "--data-dir", "{root}/nope"]),
    ("summary-bogus-arch", ["summary", "--arch", "resnet9000"]),
    ("experiment-bad-depth", ["experiment", "degradation", "--depths", "7", "--out", "{root}/exp"]),
    ("experiment-readonly-out", ["experiment", "degradation", "--depths", "8", "--iterations", "2",
                                 "--out", "{ro}/exp"]),
    # ownership: edgeres replaces or deletes only what it made, and only regular files, whatever --force says
    ("bundle-force-over-user-folder", ["bundle", "{run}", "--out", "{root}/existing_dir", "--force"]),
    ("bundle-force-over-the-run", ["bundle", "{run}", "--out", "{run}", "--force"]),
    ("bundle-force-over-folder-of-runs", ["bundle", "{run}", "--out", "{root}", "--force"]),
    ("bundle-tar-force-over-fifo", ["bundle", "{run}", "--out", "{root}/fifo_bundle", "--tar", "--force"]),
    ("export-force-over-fifo", ["export", "--weights", "{folded}", "--out", "{root}/fifo.onnx", "--force"]),
    ("fold-force-over-symlink", ["fold", "--weights", "{ck}", "--out", "{root}/link.pt", "--force"]),
    ("calib-cache-force-over-folder", ["calib-cache", "--onnx", "{onnx}", "--images", "{probe}",
                                       "--out", "{root}/existing_dir", "--force"]),
    ("build-into-user-folder", ["build", "--out", "{root}/user_folder", "--epochs", "1"]),
    ("build-out-is-fifo", ["build", "--out", "{root}/fifo.yaml", "--epochs", "1"]),
    ("train-into-user-folder", ["train", "--out", "{root}/user_train", "--epochs", "1"]),
    ("train-force-into-user-folder", ["train", "--out", "{root}/user_train", "--epochs", "1", "--force"]),
    # a refused command changes nothing: inputs are read before the first write into a run
    ("build-broken-pretrained-into-good-run", ["build", "--pretrained", "{root}/garbage.pt", "--out", "{run}"]),
    ("build-nan-lr-into-good-run", ["build", "--lr", "nan", "--out", "{run}"]),
    ("build-nan-max-drop-into-good-run", ["build", "--max-drop", "nan", "--out", "{run}"]),
    ("build-inf-bench-seconds-into-good-run", ["build", "--bench-seconds", "inf", "--out", "{run}"]),
    # special files where a regular file is expected (a FIFO would block forever)
    ("build-recipe-is-fifo", ["build", "--recipe", "{root}/fifo.yaml", "--out", "{root}/b"]),
    ("fold-weights-is-fifo", ["fold", "--weights", "{root}/fifo.pt", "--out", "{root}/f.pt"]),
    ("bench-engine-is-fifo", ["bench", "--engine", "{root}/fifo.onnx", "--iterations", "1"]),
    ("compare-probe-is-fifo", ["compare", "{onnx}", "{onnx8}", "--probe", "{root}/fifo.npz"]),
    ("predict-image-is-fifo", ["predict", "{onnx}", "{root}/fifo.png"]),
    ("report-stages-is-fifo", ["report", "{root}/fifo_run"]),
    ("build-into-run-with-fifo-stages", ["build", "--out", "{root}/fifo_run", "--epochs", "1"]),
    # bombs: small files that declare (or expand to) more than any machine holds
    ("predict-decompression-bomb", ["predict", "{onnx}", "{root}/bomb.png"]),
    ("predict-oversized-image", ["predict", "{onnx}", "{root}/big.png"]),
    ("build-billion-laughs-recipe", ["build", "--recipe", "{root}/laughs.yaml", "--out", "{run}"]),
    ("build-5000-level-recipe", ["build", "--recipe", "{root}/deep.yaml", "--out", "{run}"]),
    ("compare-probe-declares-56-gib", ["compare", "{onnx}", "{onnx8}", "--probe", "{root}/bomb.npz"]),
    # non-finite numbers and metadata of the wrong type or size
    ("build-recipe-nan-lr", ["build", "--recipe", "{root}/nan.yaml", "--out", "{run}"]),
    ("bench-duration-nan", ["bench", "--engine", "{onnx}", "--duration", "nan"]),
    ("bench-duration-inf", ["bench", "--engine", "{onnx}", "--duration", "inf"]),
    ("bench-warmup-inf", ["bench", "--engine", "{onnx}", "--warmup", "inf", "--iterations", "1"]),
    ("bench-threads-100000", ["bench", "--engine", "{onnx}", "--threads", "100000", "--iterations", "1"]),
    ("bench-input-shape-zero", ["bench", "--engine", "{root}/dynamic.onnx", "--input-shape", "0,32,32",
                                "--iterations", "1"]),
    ("eval-std-nan", ["eval", "--weights", "{ck}", "--dataset", "digits", "--std", "nan"]),
    ("predict-meta-input-size-50000", ["predict", "{root}/big_input.pt", "{root}/img.png"]),
    ("predict-meta-num-classes-1e9", ["predict", "{root}/many_classes.pt", "{root}/img.png"]),
    ("predict-meta-input-size-abc", ["predict", "{root}/abc_size.pt", "{root}/img.png"]),
    ("predict-meta-two-means-one-channel", ["predict", "{root}/two_means.pt", "{root}/img.png"]),
    ("predict-meta-nan-std", ["predict", "{root}/nan_std.pt", "{root}/img.png"]),
    ("fold-non-string-state-dict-key", ["fold", "--weights", "{root}/intkeys.pt", "--out", "{root}/f.pt"]),
    # runner errors: one line naming the model and what it expects
    ("predict-class-index-onnx", ["predict", "{root}/argmax.onnx", "{root}/img.png"]),
    ("bench-two-input-onnx", ["bench", "--engine", "{root}/two_inputs.onnx", "--iterations", "1"]),
    ("compare-two-input-onnx", ["compare", "{onnx}", "{root}/two_inputs.onnx", "--probe", "{probe}"]),
    ("bench-wrong-channel-count", ["bench", "--engine", "{root}/dynamic.onnx", "--input-shape", "3,32,32",
                                   "--iterations", "1"]),
    # issue 34, round 3: inputs checked against the model
    ("predict-class-names-fewer-than-classes", ["predict", "{root}/few_names.pt", "{root}/img.png"]),
    ("predict-nan-weights", ["predict", "{root}/nan_weights.pt", "{root}/img.png"]),
    ("eval-nan-weights", ["eval", "--weights", "{root}/nan_weights.pt", "--dataset", "digits"]),
    ("compile-random-bytes-calib-cache", ["compile", "--onnx", "{onnx}", "--out", "{root}/cc.plan", "--int8",
                                          "--calib-cache", "{root}/garbage.cache", "--trt-version", "10.3"]),
    ("check-initializer-shape-disagrees-with-data", ["check", "{root}/bad_initializer.onnx"]),
    ("compare-probe-label-past-the-classes", ["compare", "{onnx}", "{onnx8}", "--probe", "{root}/labels_10.npz"]),
    ("compare-probe-label-negative", ["compare", "{onnx}", "{onnx8}", "--probe", "{root}/labels_negative.npz"]),
    # issue 34, round 3: ownership
    ("experiment-into-user-folder", [*TINY_EXPERIMENT, "--out", "{root}/user_folder"]),
    ("experiment-force-over-users-own-file", [*TINY_EXPERIMENT, "--out", "{root}/exp_own", "--force"]),
]


@pytest.mark.parametrize("argv", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_in_one_line_and_nothing_is_lost(world, argv):
    args = [a.format(**world) for a in argv]
    before = _snapshot(world["root"])
    result = CliRunner().invoke(main, args)
    out = result.output
    assert result.exit_code != 0, f"accepted: {out}"
    assert isinstance(result.exception, SystemExit), f"traceback: {result.exception!r}\n{out}"
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1, f"expected one Error: line, got {result.stderr!r}"
    assert "Traceback" not in out and "internal error" not in out, out
    if result.exit_code != 2:   # click's usage errors show the usage line first; ours are the error alone
        assert result.stderr.rstrip().splitlines()[-1] == errors[0], result.stderr
    after = _snapshot(world["root"])
    changed = [k for k, v in before.items() if after.get(k) != v]
    assert not changed, f"changed or lost: {changed}"


def test_bad_input_suite_covers_every_command():
    commands = {c[1][0] for c in CASES}
    missing = set(main.commands) - commands - {"archs", "trt-status"}   # these take no input to get wrong
    assert not missing, f"no bad-input case for: {sorted(missing)}"


def test_a_refused_build_leaves_the_run_report_as_it_was(world):
    report = (world["run"] / "report.json").read_text()
    recipe = (world["run"] / "recipe.yaml").read_text()
    r = CliRunner().invoke(main, ["build", "--arch", "resnet9000", "--out", str(world["run"])])
    assert r.exit_code != 0
    assert (world["run"] / "report.json").read_text() == report
    assert (world["run"] / "recipe.yaml").read_text() == recipe
    r = CliRunner().invoke(main, ["report", str(world["run"]), "--json"])
    assert r.exit_code == 0, r.output
    assert '"ok": true' in r.stdout


# ---------------------------------------------------------------------------------------- verdicts re-check

def _copy_run(world, name: str) -> Path:
    import shutil

    dest = world["root"] / name
    shutil.copytree(world["run"], dest, ignore=shutil.ignore_patterns(".lock"))
    return dest


def _report(run: Path) -> dict:
    import json

    r = CliRunner().invoke(main, ["report", str(run), "--json"])
    rep = json.loads(r.stdout)
    assert r.exit_code == (0 if rep["ok"] else 1), r.output   # a FAILED verdict exits 1, as `build` does
    return rep


def _bundle(run: Path, out: Path, *extra: str):
    return CliRunner().invoke(main, ["bundle", str(run), "--out", str(out), *extra])


def test_verdict_rehashes_artifacts_and_bundle_ships_only_checked_files(world):
    run = _copy_run(world, "run_swapped")
    assert _report(run)["ok"] is True   # the copy itself passes: the control
    (run / "export" / "model_int8.onnx").write_bytes((run / "export" / "model_fp32.onnx").read_bytes())
    rep = _report(run)   # a valid ONNX, but not the one the INT8 export stage wrote and checked
    assert rep["ok"] is False and "export_int8" in rep["message"] and "sha256" in rep["message"], rep["message"]
    out = world["root"] / "dist_swapped"
    r = _bundle(run, out)
    assert r.exit_code == 1 and "sha256" in r.stderr and not out.exists(), r.output
    r = _bundle(run, out, "--allow-failed")   # even a failed run ships only files whose hash matches their record
    assert r.exit_code == 1 and "sha256" in r.stderr and not out.exists(), r.output


def test_verdict_compares_the_recipe_on_disk_and_sees_an_unfinished_build(world):
    import signal
    import subprocess
    import sys

    run = _copy_run(world, "run_killed")
    # re-build with other calibration settings and kill it once PTQ runs: recipe.yaml and plan.json are new, every
    # record is still the earlier build's (passed)
    proc = subprocess.Popen([sys.executable, "-m", "edgeres", "build", "--int8", "--arch", "mnist_resnet", "--epochs",
                             "3", "--qat-epochs", "0", "--bench-seconds", "0", "--max-drop", "100", "--calib-size", "7",
                             "--out", str(run)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        for line in proc.stdout:
            if line.startswith("[ptq] running"):
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert "calib_size: 7" in (run / "recipe.yaml").read_text()
    rep = _report(run)
    assert rep["ok"] is False and "did not finish" in rep["message"], rep["message"]
    r = _bundle(run, world["root"] / "dist_killed")
    assert r.exit_code == 1 and "did not finish" in r.stderr, r.output

    run = _copy_run(world, "run_edited")
    text = (run / "recipe.yaml").read_text()
    (run / "recipe.yaml").write_text(text + "\n# a comment changes no setting\n")
    assert _report(run)["ok"] is True
    (run / "recipe.yaml").write_text(text.replace("calib_method: percentile", "calib_method: minmax"))
    rep = _report(run)
    assert rep["ok"] is False and "recipe.yaml" in rep["message"], rep["message"]

    run = _copy_run(world, "run_fifo_plan")
    (run / "plan.json").unlink()
    os.mkfifo(run / "plan.json")   # read, it would block forever
    rep = _report(run)
    assert rep["ok"] is False and "plan.json" in rep["message"], rep["message"]


def test_bundle_force_replaces_its_own_bundle_and_nothing_else(world):
    out = world["root"] / "dist_own"
    assert _bundle(world["run"], out).exit_code == 0
    r = _bundle(world["run"], out, "--force")
    assert r.exit_code == 0, r.output   # a bundle edgeres made: replaced
    (out / "notes.txt").write_text("mine\n")
    r = _bundle(world["run"], out, "--force")
    assert r.exit_code == 1 and "notes.txt" in r.stderr, r.output
    assert (out / "notes.txt").read_text() == "mine\n" and (out / "manifest.json").is_file()


# ---------------------------------------------------------------------------------------- data edge cases

def test_predict_skips_a_decompression_bomb_with_skip_bad_images(world):
    import json

    root = world["root"]
    r = CliRunner().invoke(main, ["predict", str(world["onnx"]), str(root / "bomb.png"), str(root / "big.png"),
                                  str(root / "img.png"), "--skip-bad-images", "--json"])
    assert r.exit_code == 0, r.output
    assert [Path(p["file"]).name for p in json.loads(r.stdout)] == ["img.png"]


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    import numpy as np
    from PIL import Image

    from edgeres.data.datasets import decode_image
    from edgeres.errors import DataError

    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)   # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    gray = decode_image(str(tmp_path / "g16.png"), 1).numpy()[0]
    assert (gray == np.rint(ramp * (255 / 65535)).astype(np.uint8)).all()   # convert("L") made 99.6 % of it 255
    rgb = decode_image(str(tmp_path / "g16.png"), 3).numpy()
    assert rgb.shape == (3, 64, 64) and all((c == gray).all() for c in rgb)
    Image.fromarray(np.full((4, 4), 0.5, np.float32), mode="F").save(tmp_path / "f.tiff")
    with pytest.raises(DataError, match="floating-point"):
        decode_image(str(tmp_path / "f.tiff"), 1)


def test_mnist_labels_and_cifar_batches_are_checked(tmp_path):
    import pickle
    import warnings

    import numpy as np

    from edgeres.data.datasets import CIFAR_FILES, MNIST_FILES, load_cifar10, load_mnist
    from edgeres.errors import DataError

    def idx(arr):
        return bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape) + arr.tobytes()

    (tmp_path / "mnist").mkdir()
    for key, (name, _, _) in MNIST_FILES.items():
        arr = np.zeros((2, 28, 28), np.uint8) if key.endswith("images") else np.array([3, 42], np.uint8)
        (tmp_path / "mnist" / name).write_bytes(idx(arr))
    (tmp_path / "cifar").mkdir()
    for name in CIFAR_FILES:
        (tmp_path / "cifar" / name).write_bytes(pickle.dumps({b"data": np.zeros((0, 3072), np.uint8),
                                                               b"labels": []}, protocol=3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # md5s differ from the official files
        with pytest.raises(DataError, match="label 42"):
            load_mnist(str(tmp_path / "mnist"), download=False)
        with pytest.raises(DataError, match="0 images"):
            load_cifar10(str(tmp_path / "cifar"), download=False)


def test_json_output_has_no_nan_or_infinity():
    import json

    import click

    from edgeres.cli._common import emit

    @click.command()
    def cmd():
        emit({"loss": float("nan"), "rows": [{"ips": float("inf")}, 1.5]}, True)

    r = CliRunner().invoke(cmd)
    assert json.loads(r.stdout) == {"loss": None, "rows": [{"ips": None}, 1.5]}


@pytest.mark.parametrize("manifest", ['[1, 2]', '{"files": [1]}', '{"files": {"a.onnx": "x"}}',
                                      '{"files": {}, "run": "str"}', '{"files": {}, "run": {"name": 5}}', '{"fi'],
                         ids=["list", "files-list", "entry-not-object", "run-string", "name-number", "torn"])
def test_device_releases_exit_2_for_a_malformed_manifest(tmp_path, capsys, manifest):
    import json

    from edgeres.deploy import releases

    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "manifest.json").write_text(manifest)
    code = releases.main(["install", "--from", str(tmp_path / "b"), "--root", str(tmp_path / "r"),
                          "--state", str(tmp_path / "s")])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 2 and len(out) == 1 and "error" in json.loads(out[0]), out   # 1 would mean "the gate failed"
    assert not (tmp_path / "r" / "current").exists()


# ---------------------------------------------------------------------------------------- issue 34, round 3

def _command_tree(cmd=main, path=()):
    """(command path, command) for every command and group, walked from the command table: a new command or option
    is in every test generated from it the day it is added."""
    for name, sub in sorted(getattr(cmd, "commands", {}).items()):
        yield from _command_tree(sub, (*path, name))
    yield path, cmd


def _float_options():
    """(command path, option) for every float option of every command."""
    import click

    return [(path, p.opts[0]) for path, cmd in _command_tree() for p in cmd.params
            if isinstance(p, click.Option) and isinstance(p.type, click.types.FloatParamType)]


class TestFiniteNumbers:
    """One ParamType (edgeres.cli.types.FiniteFloat) for every float option: nan, inf and 1e308 are usage errors."""

    @pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e308"])
    @pytest.mark.parametrize("path,option", _float_options(), ids=[" ".join(p) + " " + o for p, o in _float_options()])
    def test_every_float_option_refuses_non_finite_and_huge_values(self, path, option, value):
        r = CliRunner().invoke(main, [*path, option, value])
        assert r.exit_code == 2 and isinstance(r.exception, SystemExit), (r.exception, r.output)
        assert "Traceback" not in r.output
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("Error:")]
        assert len(errors) == 1 and f"'{option}'" in errors[0] and value in errors[0], r.stderr

    def test_every_float_option_and_recipe_float_is_one_type_and_minus_zero_is_zero(self):
        import click

        from edgeres import settings
        from edgeres.cli.types import FiniteFloat
        from edgeres.recipe import RANGES

        found = {(" ".join(p), o) for p, o in _float_options()}   # the walk sees options of every origin
        assert {("status", "--timeout"), ("deploy", "--host-timeout"), ("build", "--max-drop"),
                ("quantize", "--temperature"), ("experiment degradation", "--momentum")} <= found
        floats = [k for k in RANGES if isinstance(settings._click_type(k), click.types.FloatParamType)]
        assert {"train.lr", "data.holdout"} <= set(floats)
        assert all(isinstance(settings._click_type(k), FiniteFloat) for k in floats)
        value = FiniteFloat(0, 1).convert("-0", None, None)
        assert value == 0.0 and str(value) == "0.0"

    def test_a_non_finite_ssh_timeout_never_reaches_a_connection(self, tmp_path):
        """A port that accepts TCP but never speaks SSH: nan or inf as --timeout waited forever."""
        import socket
        import sys

        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        code = ("import sys\nfrom edgeres.deploy.ssh import status\nfrom edgeres.errors import ConfigError\n"
                "try:\n    status([sys.argv[1]], connect_timeout=float(sys.argv[2]), retries=0,"
                " known_hosts=sys.argv[3])\nexcept ConfigError as e:\n    print(e)\n    sys.exit(3)\n")
        try:
            for value in ("nan", "inf"):
                p = subprocess.run([sys.executable, "-W", "ignore", "-c", code, f"u@127.0.0.1:{port}", value,
                                    str(tmp_path / "kh")], capture_output=True, text=True, timeout=60)
                assert p.returncode == 3 and "--timeout" in p.stdout, (p.stdout, p.stderr[-500:])
        finally:
            server.close()
        from edgeres.deploy import releases

        with pytest.raises(SystemExit) as e:
            releases.main(["status", "--root", str(tmp_path), "--lock-wait", "nan"])
        assert e.value.code == 2


class TestMemoryKnownFirst:
    """edgeres.memory: a model that cannot fit is refused in one line, with the numbers, before it is built."""

    def test_summary_of_a_huge_model_is_refused_fast_without_allocating(self):
        import resource
        import sys
        import time

        def limit():   # 3 GiB of address space: building that model (and running it) would need more
            resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

        t = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "edgeres", "summary", "--arch", "densenet161", "--input-size",
                            "4096", "--num-classes", "100000"], capture_output=True, text=True, timeout=300,
                           preexec_fn=limit, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
        [line] = p.stderr.strip().splitlines()
        assert line.startswith("Error: densenet161 at 4096 px, batch 1") and "GiB available" in line, line
        assert "needs ~" in line and "--input-size" in line and time.monotonic() - t < 120

    @pytest.mark.parametrize("argv", [
        ["summary", "--arch", "resnet18"],
        ["eval", "--weights", "{ck}", "--dataset", "digits"],
        ["predict", "{ck}", "{root}/img.png"],
        ["predict", "{onnx}", "{root}/img.png"],
        ["compare", "{ck}", "{onnx}", "--probe", "{probe}"],
        ["bench", "--engine", "{onnx}", "--iterations", "1"],
        ["bench", "--engine", "{ck}", "--iterations", "1"],
        ["bench", "--engine", "{foreign}", "--iterations", "1"],
    ], ids=["summary", "eval", "predict-pt", "predict-onnx", "compare", "bench-onnx", "bench-pt", "bench-foreign"])
    def test_every_command_that_runs_a_model_checks_memory_first(self, world, monkeypatch, tmp_path, argv):
        import onnx

        from edgeres import memory

        foreign = onnx.load(str(world["onnx"]))   # a model that does not say which architecture it is
        del foreign.metadata_props[:]
        onnx.save(foreign, str(tmp_path / "foreign.onnx"))
        monkeypatch.setattr(memory, "available", lambda device="cpu": 1 << 10)   # 1 KiB left
        r = CliRunner().invoke(main, [a.format(**world, foreign=tmp_path / "foreign.onnx") for a in argv])
        assert r.exit_code == 1 and isinstance(r.exception, SystemExit), (r.exception, r.output)
        [line] = [ln for ln in r.stderr.splitlines() if ln.startswith("Error:")]
        assert "needs ~" in line and "0.00 GiB available; lower" in line, line


class TestExitCodesAndFormats:
    """Output that cannot be written is an error (a reader gone, as under `| head`, ends quietly); --json is one
    document."""

    def _edgeres(self, *args: str, stdout=subprocess.PIPE):
        import sys

        return subprocess.run([sys.executable, "-m", "edgeres", *args], stdout=stdout, stderr=subprocess.PIPE,
                              text=True, timeout=120)

    def test_stdout_that_cannot_be_written_is_an_error(self):
        import sys

        closed = subprocess.run(["sh", "-c", 'exec "$0" -m edgeres summary --arch resnet18 >&-', sys.executable],
                                stderr=subprocess.PIPE, text=True, timeout=120)
        assert closed.returncode == 1 and closed.stderr.startswith("Error: standard output is closed"), closed
        assert len(closed.stderr.strip().splitlines()) == 1
        with open("/dev/full", "w") as full:
            p = self._edgeres("summary", "--arch", "resnet18", stdout=full)
        assert p.returncode == 1 and p.stderr.strip() == "Error: No space left on device", p.stderr

    def test_a_reader_that_goes_away_ends_quietly_like_head(self):
        import sys

        proc = subprocess.Popen([sys.executable, "-m", "edgeres", "archs", "--json"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        proc.stdout.close()   # the reader is gone before the first byte: every write is EPIPE
        err = proc.stderr.read()
        assert proc.wait(timeout=120) in (0, 141) and err == "", err
        p = subprocess.run(["bash", "-c", 'set -o pipefail; "$0" -m edgeres archs | head -1', sys.executable],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode in (0, 141) and p.stderr == "" and len(p.stdout.splitlines()) == 1, p

    @pytest.mark.parametrize("command", ["status", "rollback"])
    def test_fleet_json_is_one_document_and_jsonl_streams(self, command, tmp_path):
        import json
        import socket

        pytest.importorskip("asyncssh")
        with socket.socket() as s:   # a port nothing listens on: the host fails fast
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        args = [command, "--host", f"u@127.0.0.1:{port}", "--retries", "0", "--known-hosts", str(tmp_path / "kh")]
        r = CliRunner().invoke(main, [*args, "--json"])
        doc = json.loads(r.stdout)
        assert r.exit_code == 1 and [h["outcome"] for h in doc["hosts"]] == ["failed"], r.output
        assert doc["summary"] == {"ok": 0, "failed": 1, "unknown": 0, "skipped": 0, "duplicate": 0}
        r = CliRunner().invoke(main, [*args, "--jsonl"])
        lines = [json.loads(line) for line in r.stdout.splitlines()]
        assert [e["event"] for e in lines] == ["host", "summary"] and lines[0]["outcome"] == "failed", r.output
        r = CliRunner().invoke(main, [*args, "--json", "--jsonl"])
        assert r.exit_code == 2 and "choose one of --json" in r.output

    def test_compile_json_without_tensorrt_is_one_document(self, world, tmp_path):
        import json

        from edgeres.tensorrt.status import tensorrt_status

        if tensorrt_status().available:
            pytest.skip("TensorRT is installed here: compile builds an engine")
        r = CliRunner().invoke(main, ["compile", "--onnx", str(world["onnx8"]), "--out", str(tmp_path / "m.plan"),
                                      "--int8", "--json"])
        assert r.exit_code == 1 and json.loads(r.stdout)["trtexec"], r.output


class TestInputsCheckedAgainstTheModel:
    def test_non_finite_weights_are_refused_naming_the_tensor(self, world):
        name = (world["root"] / "nan_weights.name").read_text()
        for argv in (["predict", str(world["root"] / "nan_weights.pt"), str(world["root"] / "img.png"), "--json"],
                     ["fold", "--weights", str(world["root"] / "nan_weights.pt"), "--out",
                      str(world["root"] / "nan_folded.pt")]):
            r = CliRunner().invoke(main, argv)
            assert r.exit_code == 1 and f"tensor {name} holds NaN" in r.stderr and r.stdout == "", r.output

    def test_class_names_must_name_every_class(self, world):
        r = CliRunner().invoke(main, ["predict", str(world["root"] / "few_names.pt"), str(world["root"] / "img.png")])
        assert r.exit_code == 1 and "class_names must name each of the 10 classes" in r.stderr, r.output

    def test_compile_out_must_name_a_file(self, world, tmp_path, monkeypatch):
        monkeypatch.chdir(tmp_path)
        for out in ("", "plans/"):
            r = CliRunner().invoke(main, ["compile", "--onnx", str(world["onnx8"]), "--out", out, "--int8",
                                          "--trt-version", "10.3"])
            assert r.exit_code == 1 and "is not an engine file path" in r.stderr, (out, r.output)
        assert list(tmp_path.iterdir()) == []   # no hidden ./.trtexec.sh

    def test_a_calibration_cache_is_checked_line_by_line(self, tmp_path):
        from edgeres.errors import ArtifactError
        from edgeres.tensorrt.calib_cache import read_calibration_cache

        cache = tmp_path / "c.cache"
        for text, why in ((b"\xff\xfe binary", "no TRT-... header"), (b"TRT-8601-Calibration\nx: 3f800000\n", "header"),
                          (b"TRT-8601-EntropyCalibration2\nx: 7fc00000\n", "not a finite positive"),
                          (b"TRT-8601-EntropyCalibration2\n: 3f800000\n", "line 2")):
            cache.write_bytes(text)
            with pytest.raises(ArtifactError, match=why):
                read_calibration_cache(cache)
        cache.write_bytes(b"TRT-8601-EntropyCalibration2\ninput: 3c010204\n")
        assert read_calibration_cache(cache)[1]["input"] > 0


class TestOwnership:
    """edgeres replaces or deletes only the files it wrote (a project records them), never one the user added."""

    def test_fleet_ansible_force_keeps_the_users_files(self, world, tmp_path):
        dist = tmp_path / "dist"
        assert CliRunner().invoke(main, ["bundle", str(world["run"]), "--out", str(dist)]).exit_code == 0
        out = tmp_path / "project"
        argv = ["fleet", "ansible", str(dist), "--out", str(out), "--host", "nvidia@jetson1"]
        assert CliRunner().invoke(main, argv).exit_code == 0
        (out / "group_vars").mkdir()
        (out / "group_vars" / "all.yml").write_text("mine: true\n")
        (out / "notes.txt").write_text("mine\n")
        (out / "retry").mkdir()
        (out / "retry" / "deploy.retry").write_text("jetson1\n")
        r = CliRunner().invoke(main, [*argv, "--force", "--host", "nvidia@jetson2"])
        assert r.exit_code == 0, r.output
        assert (out / "group_vars" / "all.yml").read_text() == "mine: true\n" and (out / "notes.txt").is_file()
        assert (out / "retry" / "deploy.retry").is_file() and "jetson2" in (out / "inventory.ini").read_text()
        (out / "deploy.yml").write_text("# my edits\n")   # a generated file the user changed is theirs now
        r = CliRunner().invoke(main, [*argv, "--force"])
        assert r.exit_code == 1 and "deploy.yml is not a file edgeres wrote" in r.stderr, r.output
        assert (out / "deploy.yml").read_text() == "# my edits\n"

    def test_quantize_never_replaces_a_users_file_at_the_manifest_path(self, world, tmp_path):
        mine = tmp_path / "my.json"
        mine.write_text("mine\n")
        weights = str(world["run"] / "train" / "best.pt")
        for argv in (["--manifest", str(mine)], []):   # given, and the default beside --out
            out = tmp_path / "q" / "q.pt"
            default = out.parent / "calibration" / "q.manifest.json"
            if not argv:
                default.parent.mkdir(parents=True, exist_ok=True)
                default.write_text("mine\n")
            r = CliRunner().invoke(main, ["quantize", "--ptq", "--weights", weights, "--out", str(out), *argv])
            assert r.exit_code == 1 and "already exists; pass --force to replace it" in r.output, r.output
            assert (mine if argv else default).read_text() == "mine\n" and not out.exists()

    def test_bundle_force_never_deletes_a_users_folder_or_edit_at_a_member_name(self, world, tmp_path):
        out = tmp_path / "b"
        assert CliRunner().invoke(main, ["bundle", str(world["run"]), "--out", str(out)]).exit_code == 0
        (out / "probe.npz").unlink()
        (out / "probe.npz").mkdir()   # the user's folder where a bundle file was
        (out / "probe.npz" / "keep.txt").write_text("mine\n")
        r = CliRunner().invoke(main, ["bundle", str(world["run"]), "--out", str(out), "--force"])
        assert r.exit_code == 1 and "probe.npz is a folder, not the file the bundle wrote" in r.output, r.output
        assert (out / "probe.npz" / "keep.txt").read_text() == "mine\n"
        shutil.rmtree(out / "probe.npz")
        (out / "README.txt").write_text("my notes\n")   # a bundle file the user edited is theirs now
        r = CliRunner().invoke(main, ["bundle", str(world["run"]), "--out", str(out), "--force"])
        assert r.exit_code == 1 and "README.txt is changed since the bundle wrote it" in r.output, r.output
        assert (out / "README.txt").read_text() == "my notes\n"

    def test_train_into_a_run_a_build_holds_is_refused(self, world):
        import fcntl

        run = world["run"]
        with open(run / ".lock", "a+") as f:   # a build running in that folder holds this flock
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            f.seek(0)
            f.truncate()
            f.write("4242")
            f.flush()
            r = CliRunner().invoke(main, ["train", "--out", str(run / "train"), "--epochs", "1", "--force"])
            fcntl.flock(f, fcntl.LOCK_UN)
        assert r.exit_code == 1 and "is in use by a build (pid 4242)" in r.output, r.output
        assert (run / "train" / "best.pt").is_file()

    def test_train_force_never_replaces_a_symlinked_best_pt(self, world):
        link = world["root"] / "train_link" / "best.pt"
        r = CliRunner().invoke(main, ["train", "--out", str(link.parent), "--epochs", "1", "--force"])
        assert r.exit_code == 1 and "symbolic link" in r.stderr, r.output
        assert link.is_symlink() and (world["root"] / "a_file").read_text() == "I am a file\n"


# ------------------------------------------------------------------------------------- ownership matrix (issue 34)
# Every path option of every command, read from the command table itself: each is an output edgeres writes (a file
# or a folder), a folder it writes only its own paths into, or an input it only reads. A new command or option that
# is not in one of these tables fails test_every_path_option_is_classified, so none can skip the matrix below.

BUNDLE_OF_RUN = "{root}/matrix_bundle"
OUTPUTS = {   # (command, option name): (kind, argv that reaches the write, with {path} where the output goes)
    ("build", "out"): ("folder", ["build", "--arch", "mnist_resnet", "--epochs", "1", "--quiet", "--out", "{path}"]),
    ("train", "out_dir"): ("folder", ["train", "--arch", "mnist_resnet", "--epochs", "1", "--out", "{path}"]),
    ("experiment degradation", "out"): ("folder", [*TINY_EXPERIMENT, "--out", "{path}"]),
    ("bundle", "out"): ("folder", ["bundle", "{run}", "--out", "{path}"]),
    ("bundle", "mender_out"): ("file", ["bundle", "{run}", "--out", "{case}/new_bundle", "--mender", "{path}"]),
    ("fleet ansible", "out"): ("folder", ["fleet", "ansible", BUNDLE_OF_RUN, "--out", "{path}",
                                          "--host", "nvidia@jetson1"]),
    ("calib-cache", "out"): ("file", ["calib-cache", "--onnx", "{onnx}", "--out", "{path}"]),
    ("compile", "out"): ("file", ["compile", "--onnx", "{onnx8}", "--out", "{path}", "--int8"]),
    ("export", "out"): ("file", ["export", "--weights", "{folded}", "--out", "{path}"]),
    ("fold", "out"): ("file", ["fold", "--weights", "{ck}", "--out", "{path}"]),
    ("quantize", "out"): ("file", ["quantize", "--ptq", "--weights", "{folded}", "--out", "{path}"]),
    ("quantize", "manifest"): ("file", ["quantize", "--ptq", "--weights", "{folded}", "--out", "{case}/new.pt",
                                        "--manifest", "{path}"]),
}
INTO = {   # folders that are the user's by nature (an image's root file system): edgeres writes only its own paths
    ("bundle", "rootfs"), ("rootfs", "rootfs"),   # there, tested in tests/test_rootfs.py
}
READ_ONLY = {   # inputs: read, never written
    ("bench", "path"), ("build", "data_dir"), ("build", "pretrained"), ("bundle", "run_dir"), ("bundle", "sign_key"),
    ("calib-cache", "onnx_path"), ("calib-cache", "images"), ("calib-cache", "data_dir"), ("check", "model"),
    ("compare", "a"), ("compare", "b"), ("compare", "data_dir"), ("compare", "probe"), ("compile", "onnx_path"),
    ("compile", "calib_cache"), ("deploy", "bundle_dir"), ("deploy", "hosts_file"), ("deploy", "identity"),
    ("deploy", "known_hosts"), ("deploy", "ssh_config"), ("eval", "weights"), ("eval", "data_dir"),
    ("experiment degradation", "data_dir"), ("export", "weights"), ("export", "data_dir"),
    ("fleet ansible", "bundle_dir"), ("fleet ansible", "hosts_file"), ("fleet ansible", "ssh_config"),
    ("fleet ansible", "known_hosts"), ("fold", "weights"), ("fold", "data_dir"), ("predict", "model"),
    ("quantize", "weights"), ("quantize", "data_dir"), ("quantize", "teacher"), ("report", "run_dir"),
    ("rollback", "hosts_file"), ("rollback", "identity"), ("rollback", "known_hosts"), ("rollback", "ssh_config"),
    ("rootfs", "bundle_path"), ("rootfs", "trusted_keys"), ("status", "hosts_file"), ("status", "identity"),
    ("status", "known_hosts"), ("status", "ssh_config"), ("train", "data_dir"), ("weights import", "src"),
    # read, and updated in place by TensorRT on the machine that builds the engine (never here): the user names it
    # for exactly that
    ("compile", "timing_cache"),
}


def _path_options():
    import click

    for path, cmd in _command_tree():
        for p in cmd.params:
            if isinstance(p.type, click.Path) or type(p.type).__name__ == "DataDir":
                yield " ".join(path), p.name


def test_every_path_option_is_classified():
    found = set(_path_options())
    unknown = found - set(OUTPUTS) - INTO - READ_ONLY
    assert not unknown, f"path options in no ownership table (add them to OUTPUTS, INTO or READ_ONLY): {unknown}"
    stale = (set(OUTPUTS) | INTO | READ_ONLY) - found
    assert not stale, f"options in the tables that no command has: {stale}"


def _obstacle(case: Path, what: str) -> Path:
    """What the user already has at the output path: their file, their folder with a file in it, or a link."""
    case.mkdir(parents=True)
    (case / "theirs.txt").write_text("the user's own file\n")
    (case / "their_folder").mkdir()
    (case / "their_folder" / "notes.txt").write_text("the user's own notes\n")
    path = case / "out_here"
    if what == "file":
        path.write_text("the user's own file at the output name\n")
    elif what == "folder":
        path.mkdir()
        (path / "keep.txt").write_text("the user's own file in their folder\n")
    elif what == "link-to-file":
        path.symlink_to(case / "theirs.txt")
    elif what == "link-to-folder":
        path.symlink_to(case / "their_folder")
    return path


# what stands at the output path, and whether --force is passed: every one must be refused
OBSTACLES = {
    "file": [("file", False), ("folder", True), ("link-to-file", True)],
    "folder": [("folder", False), ("folder", True), ("file", True), ("link-to-folder", True)],
}
MATRIX = [(cmd, opt, what, force) for (cmd, opt), (kind, _) in sorted(OUTPUTS.items())
          for what, force in OBSTACLES[kind]]


@pytest.fixture(scope="module")
def matrix_world(world):
    bundle = Path(BUNDLE_OF_RUN.format(**world))
    if not bundle.exists():
        r = CliRunner().invoke(main, ["bundle", str(world["run"]), "--out", str(bundle)])
        assert r.exit_code == 0, r.output
    return world


@pytest.mark.parametrize("cmd,opt,what,force", MATRIX,
                         ids=[f"{c.replace(' ', '-')}-{o}-over-{w}{'-force' if f else ''}" for c, o, w, f in MATRIX])
def test_no_output_path_replaces_what_the_user_has(matrix_world, cmd, opt, what, force):
    case = matrix_world["root"] / "matrix" / f"{cmd.replace(' ', '-')}-{opt}-{what}-{int(force)}"
    path = _obstacle(case, what)
    argv = [a.format(**matrix_world, path=path, case=case) for a in OUTPUTS[(cmd, opt)][1]]
    argv += ["--force"] if force else []
    before, names_before = _snapshot(case), {p.name for p in case.iterdir()}
    result = CliRunner().invoke(main, argv)
    assert result.exit_code != 0, f"{' '.join(argv)} accepted: {result.output[-1500:]}"
    assert isinstance(result.exception, SystemExit), f"traceback: {result.exception!r}\n{result.output[-1500:]}"
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and "out_here" in errors[0], result.stderr   # refused for the obstacle, not else
    assert _snapshot(case) == before, "the user's file, folder or link target changed"
    assert {p.name for p in case.iterdir()} == names_before, "something was written beside the refused output"
