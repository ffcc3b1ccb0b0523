"""Issue 38: a finished build's INT8 artifacts side by side on its evaluation split - top-1, agreement with FP32,
agreement with the INT8 ONNX (the Jetson model) - for the CPU artifact forms made again from that build's INT8 ONNX
with the current code (`qat`, `qdq`) beside the one the build wrote.

    .venv/bin/python benchmarks/cpu_artifacts_agreement.py RUN_DIR OUT_DIR

Writes OUT_DIR/cpu_artifacts.json (and the two IRs). Needs OpenVINO.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    import numpy as np

    from edgeres.cpu import export_openvino
    from edgeres.data import get_data_for
    from edgeres.evaluate import evaluate
    from edgeres.recipe import load_recipe
    from edgeres.runners import OpenVinoRunner, OrtRunner

    run, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    test = get_data_for(load_recipe(run / "recipe.yaml")).test
    y = np.array([int(test[i][1]) for i in range(len(test))])
    int8 = run / "export" / "model_int8.onnx"
    export_openvino(int8, out / "qat.xml", unsigned_activations=True)
    export_openvino(int8, out / "qdq.xml")
    artifacts = {"FP32 ONNX (ONNX Runtime)": OrtRunner(run / "export" / "model_fp32.onnx"),
                 "INT8 ONNX (ONNX Runtime, graph as written)": OrtRunner(int8, optimize=False),
                 "CPU qat (current code)": OpenVinoRunner(out / "qat.xml"),
                 "CPU artifact the build wrote": OpenVinoRunner(run / "export" / "model_int8_cpu.xml"),
                 "CPU qdq (current code)": OpenVinoRunner(out / "qdq.xml")}
    pred = {k: evaluate(r, test, batch_size=100).logits.argmax(1) for k, r in artifacts.items()}
    fp32, jetson = pred["FP32 ONNX (ONNX Runtime)"], pred["INT8 ONNX (ONNX Runtime, graph as written)"]
    result = {k: {"top1": round(100 * float((p == y).mean()), 2),
                  "agreement_fp32": round(100 * float((p == fp32).mean()), 2),
                  "agreement_int8_onnx": round(100 * float((p == jetson).mean()), 2)} for k, p in pred.items()}
    result["n_images"] = len(y)
    (out / "cpu_artifacts.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
