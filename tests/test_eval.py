"""Evaluation of torch modules and runners, metrics, and `edgeres eval`."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edgeres.checkpoint import ModelMeta, save_checkpoint
from edgeres.cli import main
from edgeres.data import get_data
from edgeres.evaluate import evaluate, metrics_from_logits
from edgeres.models import create_model


def test_metrics_from_logits_by_hand():
    logits = np.array([[3, 1, 0, 0, 0, 0], [0, 2, 3, 1, 0, 0], [1, 0.5, -1, 0.2, 0.1, 5]], np.float32)
    labels = np.array([0, 1, 2])
    r = metrics_from_logits(logits, labels)
    assert r.top1 == pytest.approx(100 / 3) and r.top5 == pytest.approx(200 / 3) and r.n == 3
    expect = torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(labels)).item()
    assert r.loss == pytest.approx(expect, rel=1e-5)
    assert r.per_class[:3] == [100.0, 0.0, 0.0] and np.isnan(r.per_class[3])
    d = r.to_dict()
    assert "logits" not in d and d["per_class"][3] is None


class NumpyRunner:
    """A runner as other stages provide: infer(np float32 NCHW) -> logits."""

    name = "numpy-torch"

    def __init__(self, model):
        self.model = model.eval()

    def infer(self, x):
        assert x.dtype == np.float32 and x.ndim == 4
        with torch.no_grad():
            return self.model(torch.from_numpy(x)).numpy()


def test_module_and_runner_agree():
    torch.manual_seed(0)
    data = get_data(dataset="digits", input_size=16)
    model = create_model("resnet20", num_classes=10, in_channels=1)
    sub = torch.utils.data.Subset(data.test, range(50))
    a = evaluate(model, sub, batch_size=16)
    b = evaluate(NumpyRunner(model), sub, batch_size=7)
    assert a.n == b.n == 50 and np.array_equal(a.labels, b.labels)
    np.testing.assert_allclose(a.logits, b.logits, rtol=1e-4, atol=1e-5)
    assert a.top1 == b.top1 and list(a.labels) == [data.test[i][1] for i in range(50)]
    with pytest.raises(Exception, match="runner"):
        evaluate(object(), sub)


def test_cli_eval_matches_library(tmp_path):
    torch.manual_seed(1)
    model = create_model("resnet20", num_classes=10, in_channels=1)
    meta = ModelMeta(arch="resnet20", num_classes=10, in_channels=1, input_size=16, mean=(0.3,), std=(0.3,),
                     class_names=tuple("0123456789"), dataset="digits")
    ckpt = save_checkpoint(tmp_path / "m.pt", model, meta)
    r = CliRunner().invoke(main, ["eval", "--weights", str(ckpt), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    lib = evaluate(model, get_data(dataset="digits", input_size=16, mean=(0.3,), std=(0.3,)).test)
    assert out["n"] == lib.n == 359
    assert out["top1"] == pytest.approx(lib.top1) and out["top5"] == pytest.approx(lib.top5)
    r = CliRunner().invoke(main, ["eval", "--weights", str(ckpt), "--json", "--split", "train", "--mean", "0.5"])
    assert r.exit_code == 0 and json.loads(r.output)["n"] == 1438 and json.loads(r.output)["mean"] == [0.5]
    r = CliRunner().invoke(main, ["eval", "--weights", str(tmp_path / "missing.pt")])
    assert r.exit_code != 0 and "missing.pt" in r.output
    r = CliRunner().invoke(main, ["eval", "--weights", str(ckpt), "--dataset", "imagefolder"])
    assert r.exit_code == 1 and "--data-dir" in r.output
