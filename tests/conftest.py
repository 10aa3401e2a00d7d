import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Test tensors are tiny: intra-op threads buy nothing, and on a busy 2-core machine their spin-waits cost up to
    15x (20 prior steps: 31 s with two threads vs 1.9 s with one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
