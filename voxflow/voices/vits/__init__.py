"""VITS acoustic model (text encoder, duration predictor, flow, HiFi-GAN) in torch."""

from .hifigan import GeneratorConfig
from ..scales import Scales
from .model import VitsConfig, VitsSynthesizer, expand_by_durations

__all__ = ["GeneratorConfig", "Scales", "VitsConfig", "VitsSynthesizer", "expand_by_durations"]
