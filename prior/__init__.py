"""Autoregressive prior over tokenizer codes (integers in [0, K)) and its sampling functions."""

from prior.model import (PRIOR_SIZES, KVCache, Prior, PriorConfig, PriorLoss, PriorSize, PriorStep, build_prior,
                         count_parameters, next_code_loss)
from prior.sampling import CFG_SCHEDULES, SampleSettings, Sampled, decode, sample

__all__ = [
    "CFG_SCHEDULES",
    "KVCache",
    "PRIOR_SIZES",
    "Prior",
    "PriorConfig",
    "PriorLoss",
    "PriorSize",
    "PriorStep",
    "SampleSettings",
    "Sampled",
    "build_prior",
    "count_parameters",
    "decode",
    "next_code_loss",
    "sample",
]
