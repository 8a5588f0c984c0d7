"""The v2m model: temporal fusion of CLIP + optical flow (fusion.py; also the VidMuse-style long-short-term fusion of
the baseline) into a MusicGen-style decoder (decoder.py), with harmony retrieved from the training music (harmony.py,
the HarmonyBank component; it also keeps the training scenes' music for the timbre), and the scene prior (the timbre
the scene shows), put together with the preset registry in v2m.py. Presets:
pipeline/model/presets/{debug,embedded,musicgen-small}.yaml.
"""

from pipeline.model.decoder import DecoderConfig, MusicDecoder, delay_pattern, undelay
from pipeline.model.fusion import Conditioning, FusionConfig, LongShortFusion, TemporalFusion
from pipeline.model.harmony import HarmonyBank, key_agreement
from pipeline.model.v2m import (
    V2M,
    ModelConfig,
    create_model,
    list_presets,
    load_preset,
    num_params,
    scene_summary,
    token_loss,
)

__all__ = ["Conditioning", "DecoderConfig", "FusionConfig", "HarmonyBank", "LongShortFusion", "ModelConfig",
           "MusicDecoder", "TemporalFusion", "V2M", "create_model", "delay_pattern", "key_agreement", "list_presets",
           "load_preset", "num_params", "scene_summary", "token_loss", "undelay"]
