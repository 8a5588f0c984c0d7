"""import-v2m: public V2M / V2M-20K id lists -> an ingest manifest CSV (id,source,start_s,split,caption,license).

The V2M releases list YouTube videos by id. The layout of the lists varies between releases and mirrors, so this
reads every common form and reports each line it cannot use (by file and line number) instead of dropping it:
- .txt: one YouTube id or URL per line, optionally followed by a start time in seconds (space, tab or comma);
- .csv / .tsv: a column named id, video_id, youtube_id, ytid, vid, url or link; optional start (start, start_s,
  start_time, start_sec) and split columns;
- .json / .jsonl: a list of ids, a list of objects with the columns above, or {split: [ids...]};
- .parquet: the Hugging Face dataset viewer's conversion of a list (Zeyue7/V2M: one column `text`, an id a row) or
  a table with the columns above.
The published lists (Hugging Face dataset Zeyue7/V2M) are `V2M.txt`, `V2M-20k.txt` and `V2M-bench.txt`: one id a
line. The split comes from a split column, else `--split`, else the file name (train / val / valid / test / eval;
bench = test), else train. Ids become `yt_{youtube_id}` (plus `_{start}` when one video appears with several start
times).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from pipeline.shards import write_manifest

YT_ID = re.compile(r"^[A-Za-z0-9_-]{11}$")
ID_COLUMNS = ("id", "video_id", "youtube_id", "ytid", "yt_id", "vid", "url", "link", "text")
START_COLUMNS = ("start_s", "start", "start_time", "start_sec", "start_seconds")
SPLIT_WORDS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test", "eval": "test",
               "bench": "test"}
LICENSE = "YouTube: the uploader's terms; research use only, not redistributed"
URL_TEMPLATE = "https://www.youtube.com/watch?v={id}"


def youtube_id(text: str) -> str | None:
    """The 11-character YouTube id in an id or a watch / youtu.be / shorts / embed URL, or None."""
    text = text.strip()
    if YT_ID.match(text):
        return text
    url = urlparse(text if "://" in text else f"https://{text}")
    host = (url.hostname or "").removeprefix("www.").removeprefix("m.")
    candidate = None
    if host == "youtu.be":
        candidate = url.path.strip("/").split("/")[0]
    elif host.endswith("youtube.com"):
        query = parse_qs(url.query)
        if "v" in query:
            candidate = query["v"][0]
        else:
            parts = url.path.strip("/").split("/")
            if len(parts) >= 2 and parts[0] in ("shorts", "embed", "v", "live"):
                candidate = parts[1]
    return candidate if candidate and YT_ID.match(candidate) else None


def split_from_name(path: Path) -> str | None:
    for word in re.split(r"[^a-z]+", path.stem.lower()):
        if word in SPLIT_WORDS:
            return SPLIT_WORDS[word]
    return None


def _records(path: Path) -> list[tuple[int, dict]]:
    """(line number, {id, start?, split?}) for every entry of one list file."""
    suffix = path.suffix.lower()
    text = "" if suffix == ".parquet" else path.read_text(encoding="utf-8-sig")
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
        return [(i + 2, {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}) for i, row in
                enumerate(reader)]
    if suffix == ".parquet":
        import pandas as pd

        frame = pd.read_parquet(path)
        frame.columns = [str(c).strip().lower() for c in frame.columns]
        return [(i + 1, {k: ("" if v is None else v) for k, v in row.items()})
                for i, row in enumerate(frame.to_dict("records"))]
    if suffix in (".json", ".jsonl"):
        items = [json.loads(line) for line in text.splitlines() if line.strip()] if suffix == ".jsonl" else \
            json.loads(text)
        if isinstance(items, dict):  # {split: [ids]}
            items = [{"id": v, "split": k} if isinstance(v, str) else {**v, "split": k}
                     for k, vs in items.items() for v in vs]
        return [(i + 1, {"id": it} if isinstance(it, str) else {k.lower(): it[k] for k in it})
                for i, it in enumerate(items)]
    out = []
    for i, line in enumerate(text.splitlines()):
        line = line.split("#", 1)[0].strip()
        if line:
            fields = re.split(r"[\s,]+", line)
            out.append((i + 1, {"id": fields[0], **({"start": fields[1]} if len(fields) > 1 else {})}))
    return out


def convert(files: list[Path], default_split: str | None, url_template: str = URL_TEMPLATE
            ) -> tuple[list[dict], list[str]]:
    """Rows for the manifest, and one problem message per unusable entry. `url_template` makes each source URL from
    the YouTube id (`{id}`): YouTube's watch URL, or a mirror's."""
    rows, problems, seen = [], [], set()
    for path in files:
        file_split = default_split or split_from_name(path) or "train"
        for line, rec in _records(path):
            raw = next((str(rec[c]) for c in ID_COLUMNS if rec.get(c) not in (None, "")), "")
            ytid = youtube_id(raw)
            if ytid is None:
                problems.append(f"{path}:{line}: not a YouTube id or URL: {raw!r}")
                continue
            start_raw = next((rec[c] for c in START_COLUMNS if rec.get(c) not in (None, "")), 0)
            try:
                start = float(start_raw)
            except (TypeError, ValueError):
                start = math.nan
            if not (math.isfinite(start) and start >= 0):
                problems.append(f"{path}:{line}: start time {start_raw!r} is not a finite number of seconds >= 0")
                continue
            split = SPLIT_WORDS.get(str(rec.get("split") or "").lower(), file_split)
            if (ytid, start) in seen:
                problems.append(f"{path}:{line}: duplicate of {ytid} at {start:g} s (kept the first)")
                continue
            seen.add((ytid, start))
            rows.append({"ytid": ytid, "source": url_template.format(id=ytid), "start_s": start,
                         "split": split, "caption": str(rec.get("caption") or ""), "license": LICENSE})
    starts: dict[str, int] = {}
    for row in rows:
        starts[row["ytid"]] = starts.get(row["ytid"], 0) + 1
    for row in rows:
        ytid = row.pop("ytid")
        row["id"] = f"yt_{ytid}" if starts[ytid] == 1 else f"yt_{ytid}_{row['start_s']:g}".replace(".", "p")
    return rows, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="v2m import-v2m", description=__doc__.split("\n")[0])
    parser.add_argument("lists", nargs="+", type=Path,
                        help="id list files (.txt, .csv, .tsv, .json, .jsonl, .parquet)")
    parser.add_argument("--out", type=Path, default=Path("data/manifests/v2m20k.csv"))
    parser.add_argument("--split", choices=sorted(set(SPLIT_WORDS.values())), help="split for lists without one")
    parser.add_argument("--url-template", default=URL_TEMPLATE,
                        help="source URL of an id, with {id} (default: YouTube's watch URL; a mirror's otherwise)")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.lists if not p.is_file()]
    if missing:
        print(f"import-v2m: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    if "{id}" not in args.url_template:
        print(f"import-v2m: --url-template {args.url_template!r} has no {{id}}", file=sys.stderr)
        return 2
    rows, problems = convert(args.lists, args.split, args.url_template)
    for problem in problems:
        print(f"import-v2m: {problem}", file=sys.stderr)
    if not rows:
        print("import-v2m: no usable ids found", file=sys.stderr)
        return 1
    write_manifest(args.out, rows, columns=["id", "source", "start_s", "split", "caption", "license"])
    by_split = {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")}
    print(f"import-v2m: {len(rows)} videos -> {args.out} ({', '.join(f'{k} {v}' for k, v in by_split.items())}); "
          f"{len(problems)} lines not used")
    return 0
