"""Production weights that are missing, of another architecture, or truncated: each loader stops with a message that
names the file (or folder) and the problem, not a traceback from deep inside torch, demucs, open_clip, ptlflow or
transformers. The good files are real architectures with random weights, in the published layouts
(scripts/production_weights.py); small variants where the loader takes any size, to keep the suite fast."""

from __future__ import annotations

import shutil
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from pipeline.codecs import CodecError
from pipeline.codecs.encodec import EncodecCodec
from pipeline.config import ClipEncoderConfig, EncodecCodecConfig, FlowEncoderConfig
from pipeline.encoders.clip import ClipEncoder
from pipeline.encoders.flow import FlowEncoder
from pipeline.metrics.models import MissingModelError, load_passt, load_vggish
from pipeline.model import create_model, load_preset
from pipeline.model.decoder import MusicDecoder, load_musicgen_decoder
from pipeline.separate import find_weights, load_model
from tests.conftest import load_script

weights_script = load_script("production_weights")


def truncate(path: Path) -> Path:
    """The first half of the file, in place (a download cut off)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture(scope="module")
def other_state(tmp_path_factory) -> Path:
    """A checkpoint of some other network: right format, wrong architecture."""
    path = tmp_path_factory.mktemp("other") / "other.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).state_dict(), path)
    return path


def test_demucs_missing_wrong_and_truncated(tmp_path, other_state):
    from demucs.htdemucs import HTDemucs

    repo = tmp_path / "htdemucs"
    repo.mkdir()
    model = HTDemucs(sources=["drums", "bass", "other", "vocals"], samplerate=8000, segment=Fraction(1), channels=8,
                     depth=3, nfft=512, t_layers=1, t_heads=2, dconv_comp=4)
    args, kwargs = model._init_args_kwargs
    good = repo / "tiny.th"
    torch.save({"klass": HTDemucs, "args": args, "kwargs": kwargs, "state": model.state_dict()}, good)
    (repo / "htdemucs.yaml").write_text("models: ['tiny']\n")
    kind, files = find_weights("htdemucs", str(repo))
    assert load_model("htdemucs", kind, files) is not None
    with pytest.raises(SystemExit, match="no such folder"):
        find_weights("htdemucs", str(tmp_path / "absent"))
    wrong = {"klass": HTDemucs, "args": args, "kwargs": kwargs, "state": torch.load(other_state)}
    torch.save(wrong, good)
    with pytest.raises(SystemExit, match=rf"{good}: .*truncated or not a htdemucs checkpoint"):
        load_model("htdemucs", kind, files)
    torch.save({"klass": HTDemucs, "args": args, "kwargs": kwargs, "state": model.state_dict()}, good)
    truncate(good)
    with pytest.raises(SystemExit, match=rf"do not load from .*{good}"):
        load_model("htdemucs", kind, files)


def test_published_htdemucs_layout_loads(tmp_path):
    """The weights script's htdemucs: the published signature, a checksum-named .th, through demucs's own repo."""
    folder = weights_script.htdemucs(tmp_path)
    (th,) = folder.glob("955717e8-*.th")
    kind, files = find_weights("htdemucs", str(folder))
    assert kind == "local" and files[1] == th
    bag = load_model("htdemucs", kind, files)
    assert bag.samplerate == 44100 and bag.sources == ["drums", "bass", "other", "vocals"]


def test_clip_wrong_and_truncated(tmp_path, other_state):
    import open_clip

    good = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(open_clip.create_model("ViT-S-32", pretrained=None).state_dict(), good)
    assert ClipEncoder(ClipEncoderConfig(model="ViT-S-32", pretrained=str(good)), tmp_path).dim > 0
    for bad in (other_state, truncate(good)):
        with pytest.raises(RuntimeError, match=rf"embed.clip.pretrained '{bad}': cannot load weights for ViT-S-32"):
            ClipEncoder(ClipEncoderConfig(model="ViT-S-32", pretrained=str(bad)), tmp_path)
    with pytest.raises(RuntimeError, match="absent.bin"):
        ClipEncoder(ClipEncoderConfig(model="ViT-S-32", pretrained=str(tmp_path / "absent.bin")), tmp_path)


def test_ptlflow_missing_wrong_and_truncated(tmp_path, other_state):
    good = weights_script.flow(tmp_path)
    assert good.name == "rapidflow-things.ckpt"
    assert FlowEncoder(FlowEncoderConfig(method="ptlflow:rapidflow", checkpoint=str(good))).model is not None
    wrong = tmp_path / "wrong.ckpt"
    torch.save({"state_dict": torch.load(other_state)}, wrong)
    for bad in (tmp_path / "absent.ckpt", wrong, truncate(good)):
        with pytest.raises(RuntimeError, match=rf"embed.flow.checkpoint '{bad}': cannot load it into ptlflow"):
            FlowEncoder(FlowEncoderConfig(method="ptlflow:rapidflow", checkpoint=str(bad)))


def test_encodec_missing_wrong_and_truncated(tmp_path):
    from transformers import EncodecConfig, EncodecModel, MusicgenDecoderConfig

    small = EncodecConfig(sampling_rate=32000, audio_channels=1, num_filters=4, upsampling_ratios=[8, 5, 4, 4],
                          codebook_size=2048, target_bandwidths=[2.2], num_lstm_layers=1)
    good = tmp_path / "encodec"
    EncodecModel(small).save_pretrained(good)
    cfg = EncodecCodecConfig(weights=str(good))
    assert EncodecCodec(cfg).num_codebooks == 4
    wrong = tmp_path / "wrong"
    shutil.copytree(good, wrong)
    MusicgenDecoderConfig().save_pretrained(wrong)  # another model's config.json beside EnCodec weights
    with pytest.raises(CodecError, match=rf"{wrong}: the EnCodec weights do not load"):
        EncodecCodec(EncodecCodecConfig(weights=str(wrong)))
    truncate(good / "model.safetensors")
    with pytest.raises(CodecError, match=rf"{good}: the EnCodec weights do not load .*truncated"):
        EncodecCodec(cfg)
    (good / "model.safetensors").unlink()
    with pytest.raises(CodecError, match=rf"{good}: no model.safetensors"):
        EncodecCodec(cfg)


def test_musicgen_missing_wrong_and_truncated(tmp_path):
    from transformers import EncodecConfig, EncodecModel, MusicgenDecoderConfig, MusicgenForCausalLM

    dec = MusicgenDecoderConfig(vocab_size=16, num_codebooks=4, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=2, ffn_dim=64, max_position_embeddings=64, pad_token_id=16,
                                bos_token_id=16)
    good = tmp_path / "musicgen"
    MusicgenForCausalLM(dec).save_pretrained(good)
    cfg = load_preset("musicgen-small", decoder={"d_model": 32, "n_layers": 2, "n_heads": 2, "ffn_dim": 64,
                                                 "num_codebooks": 4, "codebook_size": 16, "dropout": 0.0},
                      fusion={"clip_dim": 8, "flow_dim": 6, "n_heads": 2})
    create_model(cfg, good)
    wrong = tmp_path / "encodec"
    EncodecModel(EncodecConfig(num_filters=4, num_lstm_layers=1)).save_pretrained(wrong)
    with pytest.raises(ValueError, match=rf"{wrong}/config.json: not the config of a MusicGen model"):
        create_model(cfg, wrong)
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        create_model(cfg, tmp_path / "absent")
    truncate(good / "model.safetensors")
    with pytest.raises(ValueError, match=rf"{good}: the MusicGen weight files do not load .*truncated"):
        load_musicgen_decoder(MusicDecoder(cfg.decoder), good)


def test_published_musicgen_small_config_is_the_preset():
    """The hand-written facebook/musicgen-small config gives the musicgen-small preset's decoder, size for size."""
    config = weights_script.musicgen_config()
    preset = load_preset("musicgen-small").decoder
    dec = config.decoder
    assert (dec.hidden_size, dec.num_hidden_layers, dec.num_attention_heads, dec.ffn_dim, dec.num_codebooks,
            dec.vocab_size) == (preset.d_model, preset.n_layers, preset.n_heads, preset.ffn_dim, preset.num_codebooks,
                                preset.codebook_size)
    assert config.audio_encoder.sampling_rate == 32000 and config.text_encoder.d_model == 768


def test_vggish_and_passt_wrong_and_truncated(tmp_path, other_state):
    pytest.importorskip("torchvggish")
    pytest.importorskip("hear21passt")
    vggish = weights_script.vggish(tmp_path)
    assert load_vggish(vggish) is not None
    passt = weights_script.passt(tmp_path)
    assert load_passt(passt) is not None
    for loader, good, name in ((load_vggish, vggish, "not VGGish weights"), (load_passt, passt, "not a PaSST")):
        with pytest.raises(MissingModelError, match=rf"{other_state}: {name}"):
            loader(other_state)
        truncate(good)
        with pytest.raises(MissingModelError, match=rf"{good}: {name}"):
            loader(good)
