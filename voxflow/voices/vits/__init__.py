"""VITS acoustic model (text encoder, duration predictor, flow, HiFi-GAN) in torch."""

from .hifigan import GeneratorConfig
from .model import Scales, VitsConfig, VitsSynthesizer, expand_by_durations

__all__ = ["GeneratorConfig", "Scales", "VitsConfig", "VitsSynthesizer", "expand_by_durations"]
