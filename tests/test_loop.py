"""The one training loop (edgeres/loop.py) shared by train, QAT and the degradation experiment."""
from __future__ import annotations

import pytest
import torch

from edgeres.errors import DataError
from edgeres.loop import sgd_steps


def _data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] > 0).long()
    return [(x[i], y[i]) for i in range(n)]


def test_schedule_max_steps_and_callback():
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD([{"params": [net.weight]}, {"params": [net.bias], "lr_scale": 0.5}], lr=1.0)
    loader = torch.utils.data.DataLoader(_data(), batch_size=8)
    seen_lrs, iterations = [], []

    def on_step(step):
        iterations.append(step.iteration)
        seen_lrs.append([g["lr"] for g in opt.param_groups])
        assert step.logits.shape == (8, 2) and not step.loss.requires_grad

    done = sgd_steps(net, loader, opt, criterion=torch.nn.functional.cross_entropy, lr_at=lambda i: 0.1 * (i + 1),
                     iteration=10, max_steps=3, on_step=on_step)
    assert done.steps == 3 and done.seen == 24 and iterations == [11, 12, 13]
    assert seen_lrs == [[pytest.approx(1.1), pytest.approx(0.55)], [pytest.approx(1.2), pytest.approx(0.6)],
                        [pytest.approx(1.3), pytest.approx(0.65)]]
    assert 0 <= int(done.correct) <= 24 and float(done.loss_sum) > 0


def test_training_lowers_the_loss():
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    loader = torch.utils.data.DataLoader(_data(200), batch_size=20)
    first = sgd_steps(net, loader, opt, criterion=torch.nn.functional.cross_entropy, lr_at=lambda i: 0.5)
    for _ in range(5):
        last = sgd_steps(net, loader, opt, criterion=torch.nn.functional.cross_entropy, lr_at=lambda i: 0.5)
    assert float(last.loss_sum) / last.seen < 0.6 * float(first.loss_sum) / first.seen


def test_qat_stops_on_a_diverging_loss():
    """QAT runs on the shared loop; a loss that is no longer finite stops it with one line, not NaN weights."""
    from edgeres.quantize import quantize_qat

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 2))
    with pytest.raises(DataError, match="QAT loss became .* lower --lr"):
        quantize_qat(net, _data(), _data(16, seed=1), epochs=2, lr=1e38, batch_size=8, quiet=True)


def test_qat_leaves_the_model_it_starts_from_as_it_was():
    from edgeres.quantize import quantize_qat

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 2))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    res = quantize_qat(net, _data(), _data(16, seed=1), epochs=1, lr=0.5, batch_size=8, quiet=True)
    assert res.model is not net and all(torch.equal(before[k], v) for k, v in net.state_dict().items())
