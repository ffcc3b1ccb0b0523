"""One example per command, shown at the end of its --help (commands whose docstring has none get this one).
Every line is a real invocation; tests/test_cli.py checks each command has one and that it names the command."""
from __future__ import annotations

import inspect

EXAMPLES: dict[str, str] = {
    "archs": "edgeres archs --json",
    "summary": "edgeres summary --arch resnet50 --v1",
    "train": "edgeres train --recipe imagenette_resnet18 --data-dir ~/data/imagenette --out runs/in-train",
    "eval": "edgeres eval --weights runs/in-train/best.pt --json",
    "fold": "edgeres fold --weights runs/in-train/best.pt --out folded.pt --dataset digits",
    "export": "edgeres export --weights qat.pt --int8 --out model_int8.onnx --dataset digits",
    "build": "edgeres build --data-dir ~/photos --int8          # the folder decides the dataset",
    "report": "edgeres report runs/demo --json",
    "bench": "edgeres bench --engine runs/demo/export/model_int8.onnx --batch 1,8 --json",
    "compare": "edgeres compare runs/demo/quant/qat.pt runs/demo/export/model_int8.onnx --layers",
    "compile": "edgeres compile --onnx runs/demo/export/model_int8.onnx --int8 --out model.plan",
    "calib-cache": "edgeres calib-cache --onnx model_fp32.onnx --dataset digits --trt-version 8.6.2 --out calib.cache",
    "trt-status": "edgeres trt-status --json",
    "bundle": "edgeres bundle runs/demo --out dist/demo --target jetpack6.1 --sign ~/.ssh/id_ed25519",
    "rootfs": "edgeres rootfs --bundle dist/demo --rootfs /mnt/jetson-rootfs",
    "deploy": "edgeres deploy dist/demo --host jetson1 --host jetson2 --canary 1",
    "status": "edgeres status --host jetson1 --json",
    "rollback": "edgeres rollback --host jetson1",
    "ansible": "edgeres fleet ansible dist/demo --out fleet/ --hosts-file hosts.txt --serial 1,25%,100%",
    "list": "edgeres weights list --json",
    "fetch": "edgeres weights fetch resnet18 --url http://mirror.lan/models/   # default: download.pytorch.org",
    "import": "edgeres weights import --from ~/Downloads/resnet18-f37072fd.pth",
}


def attach(cmd, name: str) -> None:
    """Append EXAMPLES[name] to the command's help, unless its docstring already shows one."""
    if name in EXAMPLES and "Example" not in (cmd.help or ""):
        # dedented first: click dedents the whole help by its smallest indent, which the example's would make 0
        cmd.help = inspect.cleandoc(cmd.help or "") + "\n\n\b\nExample:\n  " + EXAMPLES[name]
