"""edgeres/nncf_patches.py: the faster percentile statistics and bias correction give NNCF's own results exactly."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeres.nncf_patches import fast_calibration, tail_quantile

CASES = [((4, 64, 56, 56), (0, 1, 2, 3), (0.9999,)), ((4, 64, 56, 56), (0, 1, 2, 3), (0.0001,)),
         ((4, 3, 64, 64), [0, 1, 2, 3], (0.0001, 0.9999)), ((7, 5, 3), (0, 2), (0.01, 0.99)),
         ((100,), 0, (0.0001, 0.9999)), ((5, 40), None, 0.02), ((3, 1000), 1, (0.0, 1.0)), ((1000,), None, (0.999,)),
         ((2, 3, 300), -1, (0.995,))]


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("shape,axis,q", CASES)
def test_tail_quantile_is_numpys_to_the_bit(shape, axis, q, keepdims, relu):
    torch.manual_seed(0)
    a = torch.randn(*shape)
    if relu:
        a = torch.relu(a)   # half the values tied at 0: the low tail is all ties
    ref = np.quantile(a.numpy().astype(np.float64), q=q, axis=tuple(axis) if isinstance(axis, list) else axis,
                      keepdims=keepdims)
    got = tail_quantile(a, q, axis, keepdims)
    assert got is not None and got.dtype == torch.float64
    assert got.shape == ref.shape and np.array_equal(got.numpy(), ref)


def test_quantiles_away_from_the_tails_are_left_to_nncf():
    assert tail_quantile(torch.randn(4, 9), [0.3, 0.7], 1) is None


def _ptq(model, data, fast: bool):
    from edgeres.quantize import quantize_ptq

    return quantize_ptq(model, data, subset_size=len(data), batch_size=16, quiet=True, fast=fast).model


def test_ptq_with_the_speedups_equals_nncfs_own():
    """quantize_ptq(fast=True) (NHWC passes, tail quantiles, batch-1 bias correction) against NNCF exactly as it
    ships: the same quantizer ranges, the same biases up to float rounding."""
    pytest.importorskip("nncf")
    from nncf.tensor.functions import numeric

    from edgeres.fold import fold_batchnorm
    from edgeres.models import create_model

    torch.manual_seed(0)
    model = fold_batchnorm(create_model("resnet20", num_classes=10).eval()).model
    data = [(torch.randn(3, 32, 32), 0) for _ in range(48)]
    before = numeric.quantile.registry[torch.Tensor]
    a, b = _ptq(model, data, False), _ptq(model, data, True)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and len(sa) > 20
    differ = [k for k in sa if not torch.equal(sa[k], sb[k])]
    # NHWC convolutions and a batch-1 bias-correction blob round differently: float rounding only
    for k in differ:
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-4, atol=1e-5)
    assert any("scale" in k or "input_low" in k for k in sa)
    assert numeric.quantile.registry[torch.Tensor] is before   # removed on exit
    with fast_calibration() as installed:
        assert installed and numeric.quantile.registry[torch.Tensor] is not before


def test_nhwc_tensors_are_read_in_memory_order():
    """NNCF collects NHWC activations (edgeres calibrates in channels_last): same quantiles, no copy needed."""
    torch.manual_seed(0)
    a = torch.relu(torch.randn(4, 16, 20, 20)).contiguous(memory_format=torch.channels_last)
    for q in ((0.0001,), (0.9999,), (0.001, 0.999)):
        ref = np.quantile(a.numpy().astype(np.float64), q=q, axis=(0, 1, 2, 3), keepdims=True)
        assert np.array_equal(tail_quantile(a, q, (0, 1, 2, 3), True).numpy(), ref)
