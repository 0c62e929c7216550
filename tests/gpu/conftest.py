"""Skip conditions shared by the GPU tests."""

import pytest

from gpu_ops.device import cuda_available, faiss_has_gpu, package_status


@pytest.fixture(scope="session")
def cuml_gpu() -> None:
    """Skip unless CUDA is visible and cuML imports."""
    if not cuda_available():
        pytest.skip("no CUDA device visible")
    # package_status catches every import failure (a broken CUDA install raises more than
    # ImportError), so the test skips with the reason instead of erroring.
    ok, why = package_status("cuml")
    if not ok:
        pytest.skip(why)


@pytest.fixture(scope="session")
def faiss_gpu() -> None:
    """Skip unless faiss is a GPU build and sees a GPU."""
    if not cuda_available():
        pytest.skip("no CUDA device visible")
    if not faiss_has_gpu():
        pytest.skip("faiss is not a GPU build, or it sees no GPU")
