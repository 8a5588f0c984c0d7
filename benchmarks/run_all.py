"""`make bench`: run every benchmark script in benchmarks/, then write the summary table in benchmarks/README.md from
benchmarks/results/*.json.

    python benchmarks/run_all.py [--only embed train ...] [--skip demo_stages ...] [--summary-only]

Each script runs with its defaults, in its own process from the repo root, one after the other (they time things:
running two at once would spoil both). A failing script is reported and the others still run; the exit status is
non-zero if any failed. Scripts that are studies needing inputs of their own are skipped with the reason (NEEDS_INPUT).
The summary reads whatever JSON is there and says "not run" for what is missing, so a benchmark that does not exist
yet never breaks it. What ran, when and for how long goes to benchmarks/results/run_all.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
README = HERE / "README.md"
START, END = "<!-- summary: written by benchmarks/run_all.py -->", "<!-- end of summary -->"
NEEDS_INPUT = {  # script -> why `make bench` does not run it
    "train_alignment": "a study on a scratch pipeline run (--root); see docs/studies/motion.md",
    "peer_generate": "30 s of MusicGen-small-size generation, twice, ~30+ min on 2 cores: run it alone",
}
SELF = {"run_all"}


def scripts() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.py") if p.stem not in SELF and not p.stem.startswith("_"))


def run_scripts(names: list[str]) -> dict:
    log = json.loads((RESULTS / "run_all.json").read_text()) if (RESULTS / "run_all.json").exists() else {}
    # this checkout's pipeline package, whichever checkout the venv's editable install points at
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    for name in names:
        if name in NEEDS_INPUT:
            print(f"== {name}: skipped: {NEEDS_INPUT[name]}", flush=True)
            log[name] = {"status": "skipped", "reason": NEEDS_INPUT[name]}
            continue
        print(f"== {name}: python benchmarks/{name}.py", flush=True)
        started = time.perf_counter()
        cmd = [sys.executable, str(HERE / f"{name}.py")]
        code = subprocess.run(cmd, cwd=REPO, env=env).returncode
        wall = round(time.perf_counter() - started, 1)
        log[name] = {"status": "ok" if code == 0 else f"failed (exit {code})", "wall_s": wall,
                     "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        print(f"== {name}: {log[name]['status']} in {wall:.0f} s", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "run_all.json").write_text(json.dumps(log, indent=2, sort_keys=True) + "\n")
    return log


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def fmt(value, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def demo_table(demo: dict | None) -> list[str]:
    if not demo:
        return ["`make demo` by stage: not run (`python benchmarks/demo_stages.py`).", ""]
    lines = [f"`make demo` by stage (`demo_stages.json`, {demo.get('started', '?')}, {demo.get('machine', '?')}, "
             f"load average {fmt(demo.get('load_avg_1m_before'))} before / {fmt(demo.get('load_avg_1m_after'))} "
             "after: other jobs shared the CPU when it is above the CPU count):", "",
             "| stage | wall s | CPU s | peak RSS MB (process tree) | peak RSS MB (largest process) |",
             "|---|---|---|---|---|"]
    for row in demo.get("stages", []):
        lines.append(f"| {row['stage']} | {fmt(row['wall_s'])} | {fmt(row['cpu_s'])} | {fmt(row['peak_rss_mb'], 0)} "
                     f"| {fmt(row['peak_process_rss_mb'], 0)} |")
    lines.append(f"| **all stages** | **{fmt(demo.get('total_s'))}** | "
                 f"{fmt(round(sum(r['cpu_s'] for r in demo.get('stages', [])), 1))} | | |")
    noop = demo.get("repro_noop") or {}
    lines.append(f"| second `dvc repro` (stages run: {len(noop.get('ran', [])) if noop else 'n/a'}) | "
                 f"{fmt(noop.get('wall_s'))} | | | |")
    install = demo.get("install")
    lines.append(f"| install, apart: {install['command']} ({install.get('date', '?')[:10]}, .venv "
                 f"{fmt(install.get('venv_gb'))} GB) | {fmt(install['wall_s'])} | {fmt(install.get('cpu_s'))} | | |"
                 if install else "| install (`make venv`): not measured (`demo_stages.py --install`) | | | | |")
    return [*lines, ""]


def flatten(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in flatten(val, f"{prefix}{key}.").items()}
    return {prefix[:-1]: obj}


def figures() -> list[tuple[str, str, str]]:
    """(what, figure, source) rows of the headline numbers; "not run" where a result file is missing."""
    rows: list[tuple[str, str, str]] = []
    embed = load("embed")
    if embed:
        for name, enc in embed.get("encoders", {}).items():
            tag = "embedded profile" if enc.get("embedded") else "production option"
            rows.append((f"embed {name} ({tag})", f"{fmt(enc['video_s_per_wall_s'])} video-s / s", "embed.json"))
        inc = embed.get("details", {}).get("incremental", {})
        rows.append(("embed: add 1 video to " + fmt(inc.get("videos")), f"{fmt(inc.get('add_one_s'), 2)} s = "
                     f"{fmt(100 * embed['incremental_ratio'], 1)} % of the full run ({fmt(inc.get('full_s'))} s)",
                     "embed.json"))
    else:
        rows.append(("embed video-seconds per second, incremental add", "not run", "embed.json"))
    demo = load("demo_stages")
    add = (demo or {}).get("incremental_add")
    rows.append(("`dvc repro` after adding 1 clip to the demo", f"{fmt(add['wall_s'])} s for {', '.join(add['ran'])}"
                 f" = {fmt(100 * add['ratio'], 1)} % of their cold {fmt(add['cold_wall_s_same_stages'])} s"
                 if add and add.get("ratio") is not None else "not run", "demo_stages.json"))
    codec = load("codec")
    if codec:
        for key, row in sorted(codec.items()):
            rows.append((f"codec {key}", f"encode {fmt(row.get('encode_x_realtime'))}x, decode "
                         f"{fmt(row.get('decode_x_realtime'), 2)}x real time", "codec.json"))
    else:
        rows.append(("codec encode / decode speed", "not run", "codec.json"))
    train = load("train")
    if train:
        for key, row in sorted(train.items()):
            rows.append((f"train {key} (batch {row.get('batch')}, {row.get('params_m')} M params)",
                         f"{fmt(row.get('tokens_per_s'))} tokens/s, peak {fmt(row.get('peak_memory_mb'), 0)} MB",
                         "train.json"))
    else:
        rows.append(("train tokens per second", "not run", "train.json"))
    generate = load("generate")
    rtf = {k: v for k, v in flatten(generate or {}).items()
           if re.search(r"real.?time|rtf", k, re.I) and isinstance(v, (int, float))}
    if rtf:
        rows += [(f"generate {k}", fmt(v, 3), "generate.json") for k, v in sorted(rtf.items())]
    else:
        rows.append(("generate real-time factor", "not run" if generate is None else "no real-time figure in it",
                     "generate.json"))
    memory = load("generate_memory")
    for res in (memory or {}).get("results", []):
        whole = f", {fmt(res['whole']['peak_rss_mb'])} MB whole (before)" if "whole" in res else ""
        rows.append((f"generate peak RSS, {res['minutes']:g} min video", f"{fmt(res['streamed']['peak_rss_mb'])} MB "
                     f"streamed{whole}", "generate_memory.json"))
    if not memory:
        rows.append(("generate peak RSS vs video length", "not run", "generate_memory.json"))
    for _key, res in sorted((load("peer_generate") or {}).items()):
        rows.append((f"decoder vs transformers' MusicGen, {res['seconds']:g} s of music, {res['layers']} layers, "
                     f"{res['device']}", f"v2m {fmt(res['v2m']['tokens_per_s'])} tokens/s (RTF {res['v2m']['rtf']:g}),"
                     f" peer {fmt(res['peer']['tokens_per_s'])} tokens/s (RTF {res['peer']['rtf']:g}): "
                     f"**{res['ratio_v2m_over_peer']:g}x**", "peer_generate.json"))
    if not load("peer_generate"):
        rows.append(("decoder vs transformers' MusicGen", "not run", "peer_generate.json"))
    smoke = load("production_smoke")
    if smoke:
        peak = max(smoke["stages"], key=lambda s: s["peak_rss_mb"])
        rows.append(("`make production-smoke`: dvc repro of the production path, 7 real clips (random weights)",
                     f"{fmt(smoke['total_s'] / 60)} min over {len(smoke['stages'])} stages; largest peak "
                     f"{fmt(peak['peak_rss_mb'], 0)} MB ({peak['stage']})", "production_smoke.json"))
    return rows


def summary() -> str:
    lines = [START, "", *demo_table(load("demo_stages")), "| what | figure | source |", "|---|---|---|"]
    lines += [f"| {what} | {figure} | `results/{source}` |" for what, figure, source in figures()]
    runs = load("run_all") or {}
    if runs:
        lines += ["", "Last `make bench` runs: " + "; ".join(
            f"{name} {r['status']}" + (f" ({fmt(r['wall_s'], 0)} s, {r['finished'][:10]})" if "wall_s" in r else
                                      f" ({r.get('reason', '')})") for name, r in sorted(runs.items())) + "."]
    return "\n".join([*lines, "", END])


def write_summary() -> None:
    text = README.read_text() if README.exists() else "# Benchmarks\n\n"
    block = summary()
    if START in text and END in text:
        text = text[: text.index(START)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n## Summary\n\n" + block + "\n"
    README.write_text(text)
    print(f"wrote the summary in {README.relative_to(REPO)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these scripts only (names without .py)")
    parser.add_argument("--skip", nargs="+", default=[], metavar="NAME", help="do not run these")
    parser.add_argument("--summary-only", action="store_true", help="rewrite the README summary from the JSON")
    args = parser.parse_args(argv)
    failed = []
    if not args.summary_only:
        names = [n for n in scripts() if (args.only is None or n in args.only) and n not in args.skip]
        unknown = set(args.only or []) - set(scripts())
        if unknown:
            raise SystemExit(f"run_all: no benchmarks/{sorted(unknown)[0]}.py; there are: {', '.join(scripts())}")
        log = run_scripts(names)
        failed = [n for n in names if log[n]["status"].startswith("failed")]
    write_summary()
    if failed:
        print(f"run_all: failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
