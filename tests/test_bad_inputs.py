"""Bad input over every command, as a careful user would try it: each case must exit non-zero with one `Error:`
line (no traceback, no "internal error"), and every file that existed before must be byte-identical afterwards.

The artifacts are real: one small `edgeres build --int8` on the embedded digits, made once for the module.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeres.cli import main

pytestmark = pytest.mark.slow


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink() and p.name != ".lock"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A real small run plus the broken files a user might hand over."""
    root = tmp_path_factory.mktemp("bad")
    run = root / "run"
    r = CliRunner().invoke(main, ["build", "--int8", "--arch", "mnist_resnet", "--epochs", "1", "--qat-epochs", "0",
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
    yield {"root": root, "run": run, "ck": run / "train" / "best.pt", "folded": run / "fold" / "folded.pt",
           "ptq": run / "quant" / "ptq.pt", "onnx": run / "export" / "model_fp32.onnx",
           "onnx8": run / "export" / "model_int8.onnx", "probe": run / "probe.npz", "ro": ro,
           "notdir": root / "a_file" / "sub", "plan": root / "planned.plan",
           "garbage_run": garbage_run, "oneclass": one}
    if ro.name == "readonly" and os.geteuid() == 0:   # our bind mount (Path.is_mount misses bind mounts)
        subprocess.run(["umount", str(ro)], capture_output=True)


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


# (id, argv with {placeholders}) -- every case must be refused
CASES = [
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
