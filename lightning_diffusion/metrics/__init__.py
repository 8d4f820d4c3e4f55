"""Frechet Distance with pluggable, frozen feature networks; offline by default (embedded digits net)."""

from lightning_diffusion.metrics.fd import FrechetDistance, inception_fid, inception_fid_available
from lightning_diffusion.metrics.feature_nets import DigitsFeatureNet, InceptionFeatureNet, load_digits_feature_net

__all__ = [
    "DigitsFeatureNet",
    "FrechetDistance",
    "InceptionFeatureNet",
    "inception_fid",
    "inception_fid_available",
    "load_digits_feature_net",
]
