"""Profiles: named overlays on the embedded defaults, applied by writing params.yaml.

`params.yaml` is the single source DVC reads, so switching profile is a change to that file: `v2m profile use v2m20k`
writes the embedded defaults (the dataclasses in pipeline/config.py) merged with `profiles/v2m20k.yaml`, and
`dvc repro` then reruns exactly the stages whose params changed. `git diff params.yaml` shows what a switch did,
and `dvc exp run -S key=value` still tweaks single values on top.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from pipeline.config import Params, deep_merge, params_from_dict, read_yaml, to_dict
from pipeline.shards import atomic_write_text

EMBEDDED = "embedded"
HEADER = """\
# v2m parameters: profile '{name}'. Written by `v2m profile use {name}`; every key is documented in
# pipeline/config.py. Edit freely (unknown keys fail at load), or switch with `v2m profile use NAME`.
"""


def available(profile_dir: Path) -> list[str]:
    return [EMBEDDED] + sorted(p.stem for p in profile_dir.glob("*.yaml") if p.stem != EMBEDDED)


def render(name: str, profile_dir: Path) -> str:
    """The params.yaml text for profile `name` (validated before it is returned)."""
    data = to_dict(Params())
    if name != EMBEDDED:
        path = profile_dir / f"{name}.yaml"
        if not path.exists():
            raise SystemExit(f"profile: {path}: no such profile (available: {', '.join(available(profile_dir))})")
        data = deep_merge(data, read_yaml(path))
        params_from_dict(data, str(path))  # unknown keys or wrong types fail here, naming the profile file
    return HEADER.format(name=name) + yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="v2m profile", description="list, show or apply a params profile")
    parser.add_argument("action", choices=["list", "show", "use"])
    parser.add_argument("name", nargs="?", default=EMBEDDED)
    parser.add_argument("--dir", default="profiles", help="folder of profile overlays (default: profiles)")
    parser.add_argument("--params", default="params.yaml", help="file that `use` writes (default: params.yaml)")
    args = parser.parse_args(argv)
    profile_dir = Path(args.dir)
    if args.action == "list":
        for name in available(profile_dir):
            print(name)
        return 0
    text = render(args.name, profile_dir)
    if args.action == "show":
        sys.stdout.write(text)
        return 0
    atomic_write_text(args.params, text)
    print(f"profile: wrote {args.params} for profile '{args.name}'; `dvc repro` reruns the stages it changed")
    return 0
