import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Small models run fastest on one thread, and two OpenMP threads stall badly on a loaded 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
