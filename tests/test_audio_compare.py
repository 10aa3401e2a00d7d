"""The tokenizer-impact report for audio: tokenizers trained and reconstructed on spoken-digit strings, priors on the
labelled 1-s digits, samples judged by the log-mel classifier, and a classical codec row on the same clips."""
import json
import shutil

import pytest

from pipelines import compare, make_shards
from pipelines.config import parse_config

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None or shutil.which("opusenc") is None,
                                reason="espeak-ng or opus-tools missing: apt-get install -y espeak-ng flite opus-tools")
TINY_NET = {"n_filters": 4, "z_channels": 32, "dim": 64, "intermediate_dim": 64, "num_layers": 1}


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # 10 samples of a 2-step prior: degenerate features
def test_audio_report_with_a_codec_row(tmp_path):
    for source, voices in (("spoken-digits", 12), ("spoken-digit-strings", 8)):
        make_shards.main(parse_config(make_shards.MakeShardsConfig, [
            f"--source={source}", f"--out={tmp_path / source}", f"--voices={voices}", "--val_fraction=0.25"]))
    speech = {"speech_metrics": ["pesq", "stoi"], "crepe_model": "tiny", "max_clips": 2}
    overrides = {
        "tokenizer": {"batch_size": 2, "model": {"arch": "seanet-vocos", "size": "cpu", "net": TINY_NET, "dims": 1,
                                                 "in_channels": 1},
                      "losses": {"weights": {"recon/mel": 1.0, "vq/commit": 1.0}},
                      "loop": {"steps": 2, "eval_every": 2, "ckpt_every": 2, "warmup_steps": 0}},
        "prior": {"batch_size": 8, "model": {"size": "tiny"},
                  "loop": {"steps": 2, "eval_every": 2, "ckpt_every": 2, "warmup_steps": 0}},
        "sample": {"num_per_class": 1},
        "evaluate": {"classifier_cfg": {"min_steps": 5, "width": 4, "feature_dim": 8},
                     "fidelity": {"cache_dir": str(tmp_path / "cache")}},
        "reconstruct": {"audio": speech}, "codec": {"audio": speech},
    }
    argv = [f"--data={tmp_path / 'spoken-digits'}", f"--tokenizer_data={tmp_path / 'spoken-digit-strings'}",
            f"--out={tmp_path / 'cmp'}", "--presets=simvq-64", "--codecs=opus-6"]
    compare.main(parse_config(compare.CompareConfig, argv, overrides))
    rows = json.loads((tmp_path / "cmp" / "report.json").read_text())
    tok, codec = rows
    assert tok["preset"] == "simvq-64" and codec["preset"] == "opus-6" and codec["K"] is None
    for row in rows:  # both scored on the same 2 whole string clips
        assert row["metrics"]["recon/samples"] == 2 and row["metrics"]["recon/pesq_count"] == 2
    assert codec["metrics"]["recon/bitrate_kbps"] == 6 and tok["metrics"]["recon/bitrate_kbps"] == pytest.approx(0.3)
    assert codec["metrics"]["recon/pesq"] > tok["metrics"]["recon/pesq"]  # Opus beats a 2-step tokenizer
    assert "gen/class_accuracy_spoken_digits" in tok["metrics"] and "gen/fd_spoken_digits" in tok["metrics"]
    text = (tmp_path / "cmp" / "report.md").read_text()
    assert "| kbps | PESQ | STOI |" in text and "| opus-6 | – |" in text and "class acc. spoken_digits" in text
    assert "PSNR" not in text.split("## Reconstructions")[0]  # image columns stay out of an audio table
    assert (tmp_path / "cmp" / "simvq-64" / "recon" / "recon.png").is_file()


def test_demo_appends_the_audio_report_with_its_links_rebased(tmp_path):
    from pipelines.demo import merge_reports
    image, audio = tmp_path / "report.md", tmp_path / "audio" / "report.md"
    audio.parent.mkdir()
    image.write_text("# Images\n\n![](simvq-1024/samples/grid.png)\n")
    audio.write_text("# Speech\n\n| simvq-4096 | ![](simvq-4096/recon/recon.png) |\n")
    merge_reports(image, audio)
    text = image.read_text()
    assert text.startswith("# Images") and "\n## Speech\n" in text
    assert "![](audio/simvq-4096/recon/recon.png)" in text and "![](simvq-1024/samples/grid.png)" in text
