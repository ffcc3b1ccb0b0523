"""Issue 33, output a person reads: the heartbeat is one status line rewritten in place on a terminal (never a line
per tick), shown only after a silence and erased before the next output; the training bar's loss moves every
batch; the per-epoch line has no top-5 where top-5 is trivially 100 %; the CPU artifact stage says what it does."""
from __future__ import annotations

import io
import re
import sys
import time

import pytest

from edgeres import progress


class Tty(io.StringIO):
    def isatty(self):
        return True


def screen(text: str) -> list[str]:
    """What a terminal shows after `text`: carriage return goes back to the line's start, newline to the next."""
    lines, col = [""], 0
    for ch in text:
        if ch == "\n":
            lines.append("")
            col = 0
        elif ch == "\r":
            col = 0
        else:
            line = lines[-1]
            lines[-1] = line[:col] + ch + line[col + 1:]
            col += 1
    return [ln.rstrip() for ln in lines]


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(progress, "QUIET_S", 0.2)
    monkeypatch.setattr(progress, "PERIOD_S", 0.02)


def test_a_silent_stage_rewrites_one_line_in_place(fast, monkeypatch):
    tty = Tty()
    monkeypatch.setattr(sys, "stdout", tty)
    with progress.heartbeat("[train]"):
        time.sleep(1.5)
        shown = screen(tty.getvalue())
    out = tty.getvalue()
    assert "\n" not in out, "a tick is never a new line"
    assert out.count("\r[train] running (") >= 2, "the count moves"
    assert len(shown) == 1 and re.fullmatch(r"\[train\] running \([12] s\)", shown[0]), shown   # one line, in place
    assert screen(out) == [""], "erased when the stage ends"


def test_it_speaks_only_after_a_silence_and_is_erased_before_output(fast, monkeypatch):
    tty = Tty()
    monkeypatch.setattr(sys, "stdout", tty)
    with progress.heartbeat("[export]"):
        for i in range(8):   # output every 0.05 s: never silent long enough
            print(f"line {i}")
            time.sleep(0.05)
        assert "running" not in tty.getvalue()
        time.sleep(0.5)
        assert "[export] running" in screen(tty.getvalue())[-1]
        print("done")
    assert screen(tty.getvalue()) == [f"line {i}" for i in range(8)] + ["done", ""]


def test_a_line_left_unfinished_is_kept(fast, monkeypatch):
    tty = Tty()
    monkeypatch.setattr(sys, "stdout", tty)
    with progress.heartbeat("[data]"):
        print("loading... ", end="", flush=True)
        time.sleep(0.5)
        assert screen(tty.getvalue())[0] == "loading..." and "[data] running" in screen(tty.getvalue())[1]
        print("ok")
    assert screen(tty.getvalue())[0] == "loading..."


def test_bars_on_stderr_count_as_output_and_redraw_over_it(fast, monkeypatch):
    tty, err = Tty(), Tty()
    monkeypatch.setattr(sys, "stdout", tty)
    monkeypatch.setattr(sys, "stderr", err)
    with progress.heartbeat("[train]"):
        for _ in range(10):
            sys.stderr.write("\repoch 1/4: 10%|#")
            time.sleep(0.05)
        assert tty.getvalue() == ""
        time.sleep(0.5)
        assert "[train] running" in tty.getvalue()
        sys.stderr.write("\repoch 1/4: 20%|##")
        assert screen(tty.getvalue()) == [""], "erased before the bar redraws"


def test_nothing_in_a_log(fast, monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stdout", log)
    with progress.heartbeat("[x]"):
        time.sleep(0.5)
    assert log.getvalue() == ""


# ---------------------------------------------------------------------------------------------------- training lines

def test_epoch_line_says_top5_only_where_it_can_be_below_100():
    from edgeres.train import epoch_line

    row = {"epoch": 1, "train_loss": 1.2, "train_top1": 50.0, "val_loss": 1.1, "val_top1": 60.0, "val_top5": 100.0,
           "images_per_s": 12.0}
    assert "top5" not in epoch_line(row, 5) and "val loss 1.1000 top1 60.00% |" in epoch_line(row, 5)
    assert "top1 60.00% top5 100.00% |" in epoch_line(row, 6)


class _Loss:
    def __init__(self, value: float, calls: list):
        self.value, self.calls = value, calls

    def item(self) -> float:
        self.calls.append(self.value)
        return self.value


def test_the_bar_shows_each_batch_loss():
    import math

    from tqdm import tqdm

    from edgeres.loop import Step
    from edgeres.train import _bar_step

    buf, calls = io.StringIO(), []
    bar = tqdm(total=3, file=buf, mininterval=0, miniters=1)
    shown = [-math.inf]
    for i, loss in enumerate((1.5, 1.25, 0.75)):   # 3 batches an epoch: a folder of photos at batch 64
        _bar_step(bar, Step(i + 1, i, 0.003, _Loss(loss, calls), None, None, None), shown, rate=10.0)
    bar.close()
    assert calls == [1.5, 1.25, 0.75]
    assert all(f"loss={v:.3f}" in buf.getvalue() for v in calls), buf.getvalue()


def test_the_bar_reads_the_loss_no_more_often_than_it_redraws():
    import math

    from tqdm import tqdm

    from edgeres.loop import Step
    from edgeres.train import _bar_step

    calls = []
    bar = tqdm(total=200, file=io.StringIO(), mininterval=60)
    shown = [-math.inf]
    for i in range(200):   # fast GPU batches: .item() would wait for the GPU every step
        _bar_step(bar, Step(i + 1, i, 0.1, _Loss(float(i), calls), None, None, None), shown, rate=1e4)
    bar.close()
    assert calls == [0.0, 199.0], "the first batch and the last"


def test_a_few_steps_leave_bn_statistics_stale_and_refresh_fixes_them():
    """Issue 33's "val loss 3962" after epoch 1: 3 optimizer steps (a folder of 300 photos at batch 64) leave 73 % of
    BatchNorm's starting statistics (mean 0, variance 1) in place while Adam has moved the weights: eval-mode logits
    explode. Recomputed with the weights as they are, the statistics are the data's own and the eval-mode loss is
    that of the model (the same as with batch statistics)."""
    import torch

    from edgeres.loop import refresh_bn_stats, stale_bn_share
    from edgeres.models import create_model

    assert stale_bn_share(3) == pytest.approx(0.729) and stale_bn_share(44) < 0.01
    torch.manual_seed(0)
    net, crit = create_model("resnet20", num_classes=5, in_channels=3), torch.nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 5, (32,), generator=g)
    x = torch.randn(32, 3, 12, 12, generator=g) + 0.5 * y[:, None, None, None]
    opt = torch.optim.Adam(net.parameters(), lr=0.003)   # the demo recipe's optimizer
    for _ in range(3):
        loss = crit(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        batch_stats = float(crit(net(x), y))   # train mode: the same weights, the data's own statistics
        net.eval()
        stale = float(crit(net(x), y))
    assert refresh_bn_stats(net, [(x[:16], y[:16]), (x[16:], y[16:])]) == 2
    assert not net.training and all(m.momentum == 0.1 for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    with torch.no_grad():
        fresh = float(crit(net(x), y))
        first = net.bn1 if hasattr(net, "bn1") else None
    assert stale > 10 * max(fresh, batch_stats), (stale, fresh, batch_stats)
    assert fresh < 2 * batch_stats + 0.1, (fresh, batch_stats)
    if first is not None:
        with torch.no_grad():
            assert torch.allclose(first.running_mean, net.conv1(x).mean((0, 2, 3)), atol=1e-4)
    before = [b.clone() for b in net.buffers()]
    assert refresh_bn_stats(net, []) == 0 and all(torch.equal(a, b) for a, b in zip(before, net.buffers())), \
        "no batch: the statistics stay"


# ---------------------------------------------------------------------------------------------------- export_cpu

def test_the_cpu_stage_says_what_it_does_and_shows_nncf_bars(tmp_path, capsys):
    """OpenVINO's PTQ of the FP32 ONNX ran 14-25 s without a word: now a line per step and NNCF's own bars
    (statistics collection) unless quiet; quiet stays silent."""
    pytest.importorskip("openvino", reason="the CPU INT8 artifact needs OpenVINO")
    pytest.importorskip("nncf", reason="OpenVINO's PTQ is NNCF's")
    import numpy as np
    import torch
    from helpers import export_tiny_onnx

    from edgeres.cpu import export_openvino

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 3))
    onnx = export_tiny_onnx(net, tmp_path / "m.onnx", shape=(1, 1, 8, 8))
    calib = [np.random.default_rng(i).standard_normal((1, 1, 8, 8)).astype(np.float32) for i in range(4)]
    said: list[str] = []
    info = export_openvino(onnx, tmp_path / "a" / "m.xml", calibration=calib, quiet=False, say=said.append)
    assert info["method"] == "NNCF OpenVINO PTQ" and (tmp_path / "a" / "m.bin").is_file()
    assert said[0].startswith("export_cpu: converting m.onnx to OpenVINO ")
    assert said[1] == "export_cpu: INT8 by NNCF's PTQ: statistics on 4 images, then bias correction"
    assert all(len(line) <= 80 for line in said)
    assert "Statistics collection" in capsys.readouterr().out, "NNCF's bar"
    export_openvino(onnx, tmp_path / "b" / "m.xml", calibration=calib, quiet=True)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
