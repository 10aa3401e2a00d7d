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


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory):
    """Media shards of the built-in digits (16x16, 1,617 train / 180 val), at most 400 samples a shard."""
    from data.builtin import open_source
    from data.media import MediaSpec
    from data.shards import write_media_shards
    out = tmp_path_factory.mktemp("digits")
    write_media_shards(open_source("digits", "image", 16, 0, 0, "auto"), out, MediaSpec(modality="image", size=16),
                       max_count=400, log=lambda *a: None)
    return out
