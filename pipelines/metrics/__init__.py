"""Metrics library, used by training evaluation and the `reconstruct` and `evaluate` stages (never a command).

- `reconstruction.py`: one pass of a tokenizer over media shards: L1, per-modality reconstruction metrics, codebook
  utilisation, the recon grid.
- `image.py`: per-image PSNR and SSIM (skimage-exact).
- `fid.py`: FID / KID / precision-recall through torch-fidelity with a named feature extractor and a feature cache.
- `extractors.py`: the small domain classifier whose features give fid_<dataset>.
- `inception_weights.py`: the TF-2015 FID Inception weights, downloaded or converted offline and verified
  (`python -m pipelines.weights inception` is the command).
"""
