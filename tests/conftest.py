import os
from pathlib import Path

import pytest

os.environ.setdefault("NNCF_CI", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not present at {SHARED_DATA}")
    return SHARED_DATA


def pytest_collection_modifyitems(config, items):
    """Hardware markers: the default run is CPU-only and every skip says why."""
    import importlib.util

    has_trt = importlib.util.find_spec("tensorrt") is not None
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    is_jetson = Path("/etc/nv_tegra_release").exists()
    for item in items:
        if "tensorrt" in item.keywords and not (has_trt and has_cuda):
            item.add_marker(pytest.mark.skip(reason="needs TensorRT and a CUDA GPU (not installed here)"))
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "jetson" in item.keywords and not is_jetson:
            item.add_marker(pytest.mark.skip(reason="needs a Jetson device"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors, many layers: one intra-op thread is faster, above all on a shared machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
