"""Test setup: without a GPU, Triton kernels run through the interpreter (must be set before triton is imported)."""
import os

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
    # The tests run many tiny ops: with more than one intra-op thread their scheduling overhead dominates
    # (e.g. a small index_add_ takes ~3 ms with 2 threads vs ~0.02 ms with 1 on a 2-core machine).
    torch.set_num_threads(1)
except Exception:  # noqa: BLE001  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
    yield


@pytest.fixture
def ext():
    """The compiled CUDA extension (pclr._C), or a skip that says why it cannot load here."""
    from pclr.backends import cuda as cuda_backend  # imported per use: most test files never ask for it

    why = cuda_backend.extension_reason()
    if why is not None:
        pytest.skip(why)
    return True
