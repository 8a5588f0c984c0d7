"""The `v2m` command: one subcommand per stage plus tools. Each stage's `main(argv)` does the work.

    v2m synth     [--out DIR] [--n N] [--seed S]            SynthV2M, the embedded dataset
    v2m ingest    [--manifest CSV] [--out DIR]              trim, normalise, one manifest row per input
    v2m separate  [--ingest PARQUET] [--out DIR]            instrumental (Demucs) or pass-through -> data/music
    v2m embed     [--ingest PARQUET] [--out DIR]            CLIP + flow feature shards (torchrun/SLURM aware)
    v2m embed --init-encoders                               write the seeded encoder weights (models/encoders)
    v2m tokenize  [--music DIR] [--out DIR] [--real DIR]    codec tokens shards (torchrun/SLURM aware) + round trip
    v2m swaps     [--out DIR]                               timbre swaps of the train clips (text steering)
    v2m train     [--system full|no_motion] [...]            the model; resumes from its checkpoint; torchrun = DDP
    v2m train --report metrics/train.json                   merge the systems' training metrics
    v2m generate  VIDEO [VIDEO ...] -o OUT [--text ...]      music for any video, laid under it (or --wav)
    v2m generate --stage                                    the eval split -> data/generated/{system}/{id}.{wav,mp4}
    v2m evaluate  [--generated DIR] [--print]               Table 1: metrics/eval.json + reports/eval.md
    v2m evaluate --fit-tagger                               train the SynthV2M tagger (KLD/FAD stand-in)
    v2m import-v2m IDS [IDS ...] --out CSV                  V2M / V2M-20K id lists -> our manifest
    v2m metrics   --generated DIR --reference DIR [...]     the metrics library on any folders
    v2m profile   list | show NAME | use NAME               switch params.yaml between profiles
    v2m summary                                             what the pipeline produced, and where
    v2m serve     [--host H] [--port P]                     the web app: creator page + listening tests
    v2m human-eval create|invite|report|list                listening tests: define, invite raters, report
"""

from __future__ import annotations

import importlib
import logging
import sys

from pipeline.config import ConfigError

# subcommand -> "module:function"; imported lazily so `v2m --help` stays fast.
COMMANDS = {
    "synth": ("pipeline.synth:main", "generate SynthV2M clips and their manifest"),
    "ingest": ("pipeline.ingest:main", "trim and normalise the videos of a manifest"),
    "separate": ("pipeline.separate:main", "remove vocals with Demucs (or pass the audio through)"),
    "embed": ("pipeline.embed:main", "CLIP and optical-flow features of every clip, cached as shards"),
    "tokenize": ("pipeline.tokenize:main", "music -> codec tokens (fits melvq on the train split), round trip metrics"),
    "swaps": ("pipeline.swaps:main", "the train clips' scores on the other instruments, as tokens (text steering)"),
    "train": ("pipeline.train:main", "train the model (full or no_motion); resumable, DDP under torchrun"),
    "generate": ("pipeline.generate:main", "music for any video (v2m generate VIDEO -o OUT); --stage: the eval split"),
    "evaluate": ("pipeline.evaluate:main", "Table 1: metrics/eval.json + reports/eval.md; --fit-tagger: the tagger"),
    "import-v2m": ("pipeline.v2m_ids:main", "turn V2M / V2M-20K id lists into an ingest manifest"),
    "metrics": ("pipeline.metrics.cli:main", "compute the metrics for generated vs reference folders"),
    "profile": ("pipeline.profiles:main", "list, show or apply a params profile"),
    "summary": ("pipeline.summary:main", "summarise the outputs of the pipeline"),
    "serve": ("pipeline.serve.app:main", "the web app: upload a video -> scored mp4; listening tests (loopback)"),
    "human-eval": ("pipeline.human_eval:main", "listening tests: create, invite raters, report (--simulate N)"),
}


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: v2m COMMAND [ARGS ...]   (v2m COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "-v" in argv or "--verbose" in argv
    argv = [a for a in argv if a not in ("-v", "--verbose")]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("--version", "version"):
        from pipeline import __version__

        print(f"v2m {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"v2m: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    setup_logging(verbose)
    module_name, func_name = COMMANDS[name][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    try:
        return int(func(rest) or 0)
    except ConfigError as exc:
        print(f"v2m {name}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("v2m: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
