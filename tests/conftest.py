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


@pytest.fixture(scope="session")
def lpips_files(tmp_path_factory):
    """(vgg16.pth, lin.pth) in the layouts of torchvision's VGG16 weights and the LPIPS v0.1 heads, random values:
    the real files are never downloaded."""
    import torchvision

    from tokenizer.losses import VGG16_CHANNELS
    root = tmp_path_factory.mktemp("lpips")
    g = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in torchvision.models.vgg16(weights=None).state_dict().items()}
    vgg_sd = {k: torch.randn(shape, generator=g) * 0.05 for k, shape in shapes.items() if k.startswith("features.")}
    vgg_sd["classifier.6.bias"] = torch.zeros(1000)  # the classifier LPIPS ignores
    torch.save(vgg_sd, root / "vgg16.pth")
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for i, c in enumerate(VGG16_CHANNELS)}
    torch.save(lin, root / "lin.pth")
    return root / "vgg16.pth", root / "lin.pth"

