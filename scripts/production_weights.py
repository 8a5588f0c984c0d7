"""Random weights of the production models, in the on-disk layout of the published checkpoints.

    python scripts/production_weights.py --out ~/v2m-weights/random     # make production-weights
    python scripts/production_weights.py --out DIR --only clip encodec  # some of them

Nothing here is pretrained: every tensor is a seeded random initialisation of the real architecture. The files sit
where a user's downloaded weights sit, under the names the published checkpoints have, so the `production-smoke`
profile reads a folder of real weights and a folder of these the same way (`docs/production.md`):

- htdemucs: `htdemucs/htdemucs.yaml` + `htdemucs/955717e8-{sha256[:8]}.th` (a Demucs package: klass, args, kwargs,
  state), as demucs' remote `htdemucs.yaml` + `955717e8-8726e21a.th`;
- CLIP ViT-B-32: `open_clip/ViT-B-32/open_clip_pytorch_model.bin` (a state dict), as
  laion/CLIP-ViT-B-32-laion2B-s34B-b79K;
- ptlflow rapidflow: `ptlflow/rapidflow-things.ckpt` ({"state_dict": ...}, as Lightning saves it), as ptlflow's
  `things` checkpoint;
- EnCodec 32 kHz: `encodec_32khz/` config.json + model.safetensors (`save_pretrained`), as facebook/encodec_32khz;
- MusicGen-small: `musicgen-small/` config.json + model.safetensors of `MusicgenForConditionalGeneration`, as
  facebook/musicgen-small;
- VGGish: `vggish/vggish-10086976.pth` (a state dict), as harritaylor/torchvggish release v0.1;
- PaSST: `passt/passt-s-f128-20sec-p16-s10-ap.474-swa.pt` (a state dict), as kkoutini/PaSST release v0.0.5.

A file already there is kept (delete it to rebuild); `--force` rebuilds everything. `weights.json` in the folder
records what was written and says RANDOM in its first key, so no one mistakes these for trained weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

MODELS = ("htdemucs", "clip", "flow", "encodec", "musicgen", "vggish", "passt")
HTDEMUCS_SIG = "955717e8"  # the signature of the published htdemucs, as in demucs/remote/htdemucs.yaml
PASST_FILE = "passt-s-f128-20sec-p16-s10-ap.474-swa.pt"
VGGISH_FILE = "vggish-10086976.pth"


def _sha8(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:8]


def _save(obj, path: Path) -> Path:
    """torch.save under a temporary name, then rename: a killed run leaves no half-written checkpoint."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def htdemucs(out: Path) -> Path:
    """A Demucs local repo with the published htdemucs architecture (HTDemucs, 4 sources, 44.1 kHz, 7.8 s segment)."""
    from fractions import Fraction

    from demucs.htdemucs import HTDemucs

    folder = out / "htdemucs"
    if (folder / "htdemucs.yaml").is_file() and list(folder.glob(f"{HTDEMUCS_SIG}-*.th")):
        return folder
    model = HTDemucs(sources=["drums", "bass", "other", "vocals"], samplerate=44100, audio_channels=2,
                     segment=Fraction(39, 5))
    args, kwargs = model._init_args_kwargs
    tmp = _save({"klass": HTDemucs, "args": args, "kwargs": kwargs, "state": model.state_dict()},
                folder / f"{HTDEMUCS_SIG}.th.part")
    os.replace(tmp, folder / f"{HTDEMUCS_SIG}-{_sha8(tmp)}.th")  # demucs checks the name's sha256 prefix
    (folder / "htdemucs.yaml").write_text(f"models: ['{HTDEMUCS_SIG}']\n")
    return folder


def clip(out: Path) -> Path:
    import open_clip

    path = out / "open_clip" / "ViT-B-32" / "open_clip_pytorch_model.bin"
    if not path.is_file():
        _save(open_clip.create_model("ViT-B-32", pretrained=None).state_dict(), path)
    return path


def flow(out: Path, name: str = "rapidflow") -> Path:
    import ptlflow

    path = out / "ptlflow" / f"{name}-things.ckpt"
    if not path.is_file():
        _save({"state_dict": ptlflow.get_model(name).state_dict()}, path)
    return path


def encodec(out: Path) -> Path:
    from transformers import EncodecModel

    from pipeline.codecs.encodec import architecture

    folder = out / "encodec_32khz"
    if not (folder / "model.safetensors").is_file():
        EncodecModel(architecture()).save_pretrained(folder)
    return folder


def musicgen_config():
    """facebook/musicgen-small's configuration, written out by hand (no hub): a T5-base text encoder, EnCodec 32 kHz
    and a 24-layer, 1024-wide decoder over 4 codebooks of 2048."""
    from transformers import MusicgenConfig, MusicgenDecoderConfig, T5Config

    from pipeline.codecs.encodec import architecture

    text = T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12,
                    relative_attention_num_buckets=32, dropout_rate=0.1, feed_forward_proj="relu")
    decoder = MusicgenDecoderConfig(vocab_size=2048, num_codebooks=4, hidden_size=1024, num_hidden_layers=24,
                                    num_attention_heads=16, ffn_dim=4096, max_position_embeddings=2048,
                                    activation_function="gelu", dropout=0.1, attention_dropout=0.0,
                                    activation_dropout=0.0, layerdrop=0.0, scale_embedding=False,
                                    pad_token_id=2048, bos_token_id=2048, tie_word_embeddings=False)
    return MusicgenConfig(text_encoder=text.to_dict(), audio_encoder=architecture().to_dict(),
                          decoder=decoder.to_dict())


def musicgen(out: Path) -> Path:
    from transformers import MusicgenForConditionalGeneration

    folder = out / "musicgen-small"
    if not (folder / "model.safetensors").is_file():
        MusicgenForConditionalGeneration(musicgen_config()).save_pretrained(folder)
    return folder


def vggish(out: Path) -> Path:
    from pipeline.metrics.models import vggish_network

    path = out / "vggish" / VGGISH_FILE
    if not path.is_file():
        _save(vggish_network().state_dict(), path)
    return path


def passt(out: Path) -> Path:
    import contextlib

    from hear21passt.models import passt as passt_models

    path = out / "passt" / PASST_FILE
    if not path.is_file():
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            net = passt_models.get_model(arch="passt_20sec", pretrained=False, input_tdim=2000)
        _save(net.state_dict(), path)
    return path


def create(out: Path, only: tuple[str, ...] = MODELS, seed: int = 0) -> dict[str, str]:
    """Write the random weights of `only` under `out`; returns {model: path}."""
    import torch

    builders = {"htdemucs": htdemucs, "clip": clip, "flow": flow, "encodec": encodec, "musicgen": musicgen,
                "vggish": vggish, "passt": passt}
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in only:
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        written[name] = str(builders[name](out))
        print(f"production-weights: {name:9s} {written[name]} ({time.perf_counter() - t0:.1f} s)", flush=True)
    record = out / "weights.json"
    previous = json.loads(record.read_text())["files"] if record.is_file() else {}
    text = json.dumps({"RANDOM": "random weights of the real architectures, NOT trained: the music they make is noise",
                       "seed": seed, "files": {**previous, **written}}, indent=2)
    tmp = record.with_name(f".weights.json.tmp{os.getpid()}")
    tmp.write_text(text + "\n")
    os.replace(tmp, record)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the weights folder (the profile points here)")
    parser.add_argument("--only", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--force", action="store_true", help="rebuild files that exist")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.force and args.out.exists():
        import shutil

        for name in ("htdemucs", "open_clip", "ptlflow", "encodec_32khz", "musicgen-small", "vggish", "passt"):
            shutil.rmtree(args.out / name, ignore_errors=True)
    create(args.out, tuple(args.only), args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
