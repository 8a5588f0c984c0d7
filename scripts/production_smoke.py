"""The production path end to end: the `production-smoke` profile through `dvc repro`, on real clips, in a scratch copy.

    python scripts/production_smoke.py [--root DIR] [--weights weights] [--port 8791]   # make production-smoke

1. The weights folder (`--weights`, default `weights/`) gets what is missing of the production models' weights in
   their published layout (scripts/production_weights.py: RANDOM weights unless you put real ones there first).
2. A loopback HTTP server (127.0.0.1:`--port`) serves `../shared/data`, and the manifest lists its videos as URLs of
   that server, so ingest fetches them with yt-dlp exactly as it fetches YouTube URLs. One more entry points at a file
   the server does not have (a 404: a `skipped` row), and the videos without music or without audio end as
   `skipped` rows too.
3. A copy of this checkout (what git tracks, as in the working tree) in `--root` gets the profile (`v2m profile use
   production-smoke`), the manifest and a link to the weights, and runs `dvc repro evaluate train_report` one stage at
   a time, timing each (wall, CPU, peak RSS of its process tree; benchmarks/demo_stages.py's poller). The repo's
   own data/ and dvc.lock are not touched. A second `dvc repro` must have nothing to do (resumability).
4. `reports/production_smoke.md` and `benchmarks/results/production_smoke.json` get the stage table, the manifest
   rows (id -> status / reason) and the commands. Rerunning with the same `--root` resumes: DVC skips the stages that
   are done.

Random weights make noise, not music: the run proves plumbing, shapes, formats, resumability and timing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "scripts"))

import demo_stages  # noqa: E402 - benchmarks/ is not a package: its copy, run and poller are reused here
from loopback_server import THROTTLED, TRUNCATED, LoopbackServer  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "production_smoke.json"
REPORT = REPO / "reports" / "production_smoke.md"
PROFILE = "production-smoke"
TARGETS = ["evaluate", "train_report"]
# (id, path under ../shared/data, start_s, split): clip_seconds 8 from start_s. The videos without music (room
# sound, a silent track, no audio stream) test the skip paths; `missing` is not on the server (HTTP 404); the
# loopback server answers the first request for the frog with HTTP 429 and cuts the rabbit off halfway
# (scripts/loopback_server.py).
CLIPS = [
    ("bbb_a", "videos_with_music/big_buck_bunny_0-30s.webm", 2.0, "train"),
    ("sintel_a", "videos_with_music/sintel_excerpt_26s.mp4", 0.0, "train"),
    ("toy_crystal", "videos/mdn_toy_crystal_12s.webm", 0.0, "train"),
    ("tears", "videos_with_music/tears_of_steel_2s.webm", 0.0, "train"),
    ("bbb_b", "videos_with_music/big_buck_bunny_0-30s.webm", 18.0, "test"),
    ("sintel_b", "videos_with_music/sintel_excerpt_26s.mp4", 14.0, "test"),
    ("nasa_silent", "videos/nasa_earth_night_30s.mp4", 0.0, "test"),
    ("rocket_no_audio", "videos/rocket_launch_17s.mp4", 0.0, "test"),
    ("missing", "videos_with_music/not_on_the_server.mp4", 0.0, "test"),
    ("toy_frog_throttled", f"{THROTTLED[1:]}/videos/mdn_toy_frog_8s.webm", 0.0, "train"),
    ("toy_rabbit_truncated", f"{TRUNCATED[1:]}/videos/mdn_toy_rabbit_8s.webm", 0.0, "test"),
]


def write_manifest(path: Path, url: str) -> None:
    import pandas as pd

    from pipeline.shards import write_manifest as write

    rows = [{"id": i, "source": f"{url}/{rel}", "start_s": s, "split": split, "caption": "",
             "license": "see ../shared/data/MANIFEST.tsv"} for i, rel, s, split in CLIPS]
    write(path, pd.DataFrame(rows).to_dict("records"), columns=["id", "source", "start_s", "split", "caption",
                                                                "license"])


def prepare(root: Path, weights: Path, port: int) -> Path:
    """The scratch project in root/v2m (created once; a rerun keeps it and resumes)."""
    repo = root / "v2m"
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    if not (repo / ".git").is_dir():
        repo.mkdir(parents=True, exist_ok=True)
        demo_stages.copy_checkout(repo)
        shared = REPO.parent / "shared"
        if shared.is_dir() and not (root / "shared").exists():
            (root / "shared").symlink_to(shared)  # ../shared beside the copy, as beside a clone
        identity = ["-c", "user.name=smoke", "-c", "user.email=smoke@example.invalid"]
        for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", *identity, "commit", "-qm", "copy"]):
            subprocess.run(cmd, cwd=repo, check=True, capture_output=True)
        if not (repo / ".dvc").is_dir():
            subprocess.run(["dvc", "init", "-q"], cwd=repo, env=env, check=True)
    # one copy of each output, not two: the checkpoints alone are ~15 GB (docs/v2m20k.md, Disk)
    subprocess.run(["dvc", "config", "--local", "cache.type", "reflink,hardlink,symlink"], cwd=repo, env=env,
                   check=True)
    if not (repo / "weights").exists():
        (repo / "weights").symlink_to(weights.resolve())
    subprocess.run(["v2m", "profile", "use", PROFILE], cwd=repo, env=env, check=True, capture_output=True)
    write_manifest(repo / "data" / "manifests" / "production_smoke.csv", f"http://127.0.0.1:{port}")
    return repo


def manifest_rows(repo: Path, name: str) -> list[dict]:
    import pandas as pd

    path = repo / "data" / name / "manifest.parquet"
    if not path.exists():
        return []
    cols = ["id", "status", "reason", "error"]
    frame = pd.read_parquet(path)
    return frame[[c for c in cols if c in frame.columns]].fillna("").astype(str).to_dict("records")


def report(results: dict) -> str:
    lines = ["# production-smoke: the production path end to end (RANDOM weights)", "",
             "**The weights are random** (real architectures, published file layouts, `make production-weights`), so "
             "the music is noise and every quality metric below is meaningless. This run proves the plumbing: "
             "yt-dlp downloads, shapes, file formats, DVC stages, resumability, time and memory.", "",
             f"Command: `{results['command']}` ({results['machine']}, load average {results['load_avg_1m_before']:.1f}"
             f" before, {results.get('load_avg_1m_after', 0):.1f} after; started {results['started']}).", "",
             "| stage | wall s | CPU s | peak RSS MB (process tree) | peak RSS MB (largest process) |",
             "|---|---|---|---|---|"]
    for s in results["stages"]:
        largest = "n/a" if s.get("peak_process_rss_mb") is None else f"{s['peak_process_rss_mb']:,.0f}"
        lines.append(f"| {s['stage']} | {s['wall_s']:.1f} | {s['cpu_s']:.0f} | {s['peak_rss_mb']:,.0f} | {largest} |")
    lines += [f"| **all stages** | **{results['total_s']:.1f}** | {sum(s['cpu_s'] for s in results['stages']):.0f} "
              "| | |", ""]
    if "repro_noop" in results:
        lines += [f"Second `dvc repro {' '.join(TARGETS)}`: {results['repro_noop']['wall_s']:.1f} s, stages run: "
                  f"{results['repro_noop']['ran'] or 'none'}.", ""]
    lines += ["## Ingest: one manifest row per entry (yt-dlp from the loopback server)", "",
              "| id | source | status | reason |", "|---|---|---|---|"]
    sources = {i: rel for i, rel, _, _ in CLIPS}
    for row in results.get("ingest_rows", []):
        lines.append(f"| {row['id']} | {sources.get(row['id'], '')} | {row['status']} | {row.get('reason', '')} |")
    if results.get("metrics"):
        lines += ["", "## Metrics (noise: random weights)", "", "```json",
                  json.dumps(results["metrics"], indent=1)[:3000], "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/v2m-production-smoke"),
                        help="scratch folder (kept: rerun to resume)")
    parser.add_argument("--weights", type=Path, default=REPO / "weights", help="weights folder (published layout)")
    parser.add_argument("--port", type=int, default=8791, help="loopback port (part of the manifest's URLs)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--report", type=Path, default=REPORT)
    args = parser.parse_args(argv)
    shared = REPO.parent / "shared" / "data"
    if not shared.is_dir():
        print(f"production-smoke: {shared}: the real clips are not there", file=sys.stderr)
        return 2
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    t0 = time.perf_counter()
    # in a process of its own: this one stays small (it polls the stages' memory for the whole run)
    subprocess.run([sys.executable, str(REPO / "scripts" / "production_weights.py"), "--out", str(args.weights)],
                   check=True)
    weights_s = round(time.perf_counter() - t0, 1)
    command = " ".join(["python scripts/production_smoke.py", *(sys.argv[1:] if argv is None else argv)]).strip()
    results: dict = {"command": f"{command} (make production-smoke)", "profile": PROFILE,
                     "weights": "RANDOM (scripts/production_weights.py)", "weights_s": weights_s,
                     "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                     "load_avg_1m_before": os.getloadavg()[0]}
    try:
        server = LoopbackServer(shared, args.port)
    except OSError as exc:
        print(f"production-smoke: cannot serve on 127.0.0.1:{args.port} ({exc.strerror}): pass another --port",
              file=sys.stderr)
        return 2
    repo = prepare(args.root, args.weights, args.port)
    log_path = args.out.with_suffix(".log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with server, open(log_path, "a") as log:
        order = demo_stages.pipeline_order(repo, env)
        needed = {name for target in TARGETS for name in re.findall(r'^"([^"]+)";$', subprocess.run(
            ["dvc", "dag", "--dot", target], cwd=repo, env=env, check=True, capture_output=True, text=True).stdout,
            re.M)}
        # --no-commit: outputs are not copied into the DVC cache (13 GB of checkpoints would be 26 GB)
        stages = demo_stages.run_stages([s for s in order if s in needed], repo, env, log, ("--no-commit",))
        results["stages"] = stages
        results["total_s"] = round(sum(s["wall_s"] for s in stages), 1)
        # then one commit: with the cache linked (cache.type above) it moves no bytes, and it lets the closing
        # `dvc repro` see every output in the cache, so that a finished run is a clean no-op
        commit = demo_stages.run(["dvc", "commit", "--force", "--with-deps", *TARGETS], repo, env, log)
        results["commit_s"] = commit["wall_s"]
        noop = demo_stages.run(["dvc", "repro", *TARGETS], repo, env, log)
        results["repro_noop"] = {"wall_s": noop["wall_s"],
                                 "ran": [line.split("'")[1] for line in noop["output"].splitlines()
                                         if line.startswith("Running stage '")]}
    results["ingest_rows"] = manifest_rows(repo, "ingest")
    metrics = repo / "metrics" / "eval.json"
    results["metrics"] = json.loads(metrics.read_text()).get("systems") if metrics.exists() else None
    results["load_avg_1m_after"] = os.getloadavg()[0]
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(report(results))
    print(f"production-smoke: {results['total_s']:.0f} s over {len(stages)} stages; wrote {args.out} and {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
