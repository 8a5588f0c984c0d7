"""The listening test: blinded pairwise comparisons of the evaluate stage's renders, and the report.

    v2m human-eval create NAME [--systems full no_motion ...] [--clips N] [--simulate N]   an experiment -> its link
    v2m human-eval invite NAME [--raters N]                                                 personal rater links
    v2m human-eval report [NAME] [--out reports/human_eval.md]                               win rates, CIs, ranking
    v2m human-eval list                                                                      experiments and progress

Params: serve (db_path, host, port), serve.study. State lives in the web app's SQLite file (pipeline/serve/db.py);
raters answer through `v2m serve` at /study/{join token} (a new rater per visit) or their personal /listen/{token}.

Design. An experiment is the same test clips rendered by two or more systems ({generated_dir}/{system}/{id}.mp4, the
generate stage's layout). Each rater sees every clip once, paired with one of the P = K(K-1)/2 system pairs: rater r
gets pair (r + c) mod P on clip c, in swapped order when (r // P + c) is odd, so every block of 2P raters sees each
clip with each pair in both orders exactly once (balanced pairing and A/B order); the order of the clips is shuffled
per rater. Every plan is stored (items table) before the rater answers, so the design is recorded, not recomputed.
Two attention checks are mixed in: the same render as both versions (a careful rater answers tie overall) and
`check_good` against `check_bad` (the true music against another clip's: a careful rater picks it for alignment). A
rater who fails either is flagged and left out of the report (the report says how many).

Report. Per criterion and system pair, the win rate of the first system (a win 1, a tie 1/2) with a 95 % confidence
interval from a bootstrap over raters (answers of one rater are not independent); a Bradley-Terry ranking fitted on
the decisive answers (ties left out) by Hunter's MM algorithm, log-strengths centred at 0 with bootstrap CIs; MOS per
system. `--simulate N` adds N synthetic raters who answer from known Bradley-Terry strengths (a share of them at
random); the report then says SIMULATED and compares what it recovered with the truth: that checks the statistics and
is not a result.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import random
import secrets
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.config import Params, StudyConfig, load_params
from pipeline.serve.db import CRITERIA, Database
from pipeline.shards import atomic_path, atomic_write_text

log = logging.getLogger(__name__)
TIE_PROBABILITY = 0.2  # simulated careful raters answer tie this often on a real pair


class StudyError(ValueError):
    """A problem with an experiment's definition or its answers; one line."""


# ----------------------------------------------------------------------------------------------------------------------
# experiments and raters
# ----------------------------------------------------------------------------------------------------------------------

def available_clips(generated_dir: Path, systems: list[str]) -> list[str]:
    """Ids rendered by every system ({generated_dir}/{system}/{id}.mp4), sorted."""
    sets = [{p.stem for p in (generated_dir / s).glob("*.mp4")} for s in systems]
    return sorted(set.intersection(*sets)) if sets else []


def create_experiment(db: Database, name: str, study: StudyConfig, seed: int = 0) -> dict:
    """Define experiment `name` from the renders in study.generated_dir; returns its row."""
    systems, root = list(study.systems), Path(study.generated_dir)
    if len(systems) < 2 or len(set(systems)) != len(systems):
        raise StudyError(f"an experiment compares two or more different systems, got {systems}")
    missing = [s for s in systems if not (root / s).is_dir()]
    if missing:
        raise StudyError(f"{root}: no renders of {', '.join(missing)} (run the generate stage, or pick --systems)")
    clips = available_clips(root, systems)[: study.max_clips]
    if not clips:
        raise StudyError(f"{root}: no clip is rendered by all of {', '.join(systems)}")
    good, bad = study.check_good, study.check_bad
    if not all((root / s / f"{clip}.mp4").is_file() for s in (good, bad) for clip in clips):
        log.warning("%s: no %s and %s renders of every clip: the good-vs-bad attention check is left out", root,
                    good, bad)
        good = bad = None
    if db.one("SELECT id FROM experiments WHERE name = ?", (name,)):
        raise StudyError(f"experiment {name!r} exists already (pick another name)")
    db.execute("INSERT INTO experiments (name, join_token, generated_dir, systems, clips, check_good, check_bad, seed,"
               " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
               (name, secrets.token_urlsafe(16), str(root), json.dumps(systems), json.dumps(clips), good, bad, seed,
                time.time()))
    return get_experiment(db, name)


def get_experiment(db: Database, name: str | None = None, join_token: str | None = None) -> dict:
    """An experiment by name or join token (the newest when neither is given), with its lists decoded."""
    if join_token is not None:
        row = db.one("SELECT * FROM experiments WHERE join_token = ?", (join_token,))
    elif name is not None:
        row = db.one("SELECT * FROM experiments WHERE name = ?", (name,))
    else:
        row = db.one("SELECT * FROM experiments ORDER BY id DESC LIMIT 1")
    if row is None:
        raise StudyError(f"no experiment {name!r}" if name else "no experiment (create one: v2m human-eval create)")
    row["systems"], row["clips"] = json.loads(row["systems"]), json.loads(row["clips"])
    row["truth"] = json.loads(row["truth"]) if row["truth"] else None
    return row


def plan_items(experiment: dict, idx: int) -> list[tuple[str, str, str, str]]:
    """Rater `idx`'s items in the order shown: (clip, kind, system_a, system_b). Deterministic in (seed, idx)."""
    systems, clips = experiment["systems"], experiment["clips"]
    pairs = list(itertools.combinations(systems, 2))
    items = []
    for c, clip in enumerate(clips):
        a, b = pairs[(idx + c) % len(pairs)]
        if (idx // len(pairs) + c) % 2:
            a, b = b, a
        items.append((clip, "pair", a, b))
    rng = random.Random(f"{experiment['seed']}:{idx}")
    rng.shuffle(items)
    checks = [(rng.choice(clips), "identical", systems[0], systems[0])]
    if experiment["check_good"]:
        good, bad = experiment["check_good"], experiment["check_bad"]
        checks.append((rng.choice(clips), "good_bad", *((good, bad) if rng.random() < 0.5 else (bad, good))))
    for check in checks:  # never first: a rater learns the page on a real pair
        items.insert(rng.randint(1, len(items)), check)
    return items


def add_rater(db: Database, experiment: dict, simulated: bool = False, careless: bool | None = None) -> str:
    """A new rater of `experiment` with the next index and its stored plan; returns the rater's token."""
    with db.write() as conn:  # BEGIN IMMEDIATE: two raters arriving at once get different indices
        return _insert_rater(conn, experiment, simulated, careless)[0]


def _insert_rater(conn, experiment: dict, simulated: bool, careless: bool | None) -> tuple[str, list[tuple]]:
    """Insert a rater and its plan inside an open write transaction -> (token, [(item id, clip, kind, a, b)])."""
    token = secrets.token_urlsafe(16)
    idx = conn.execute("SELECT COUNT(*) FROM raters WHERE experiment_id = ?", (experiment["id"],)).fetchone()[0]
    rater_id = conn.execute(
        "INSERT INTO raters (experiment_id, token, idx, simulated, careless, created_at) VALUES (?, ?, ?, ?, ?, ?)",
        (experiment["id"], token, idx, int(simulated), None if careless is None else int(careless),
         time.time())).lastrowid
    items = []
    for pos, item in enumerate(plan_items(experiment, idx)):
        item_id = conn.execute("INSERT INTO items (rater_id, position, clip, kind, system_a, system_b) "
                               "VALUES (?, ?, ?, ?, ?, ?)", (rater_id, pos, *item)).lastrowid
        items.append((item_id, *item))
    return token, items


# ----------------------------------------------------------------------------------------------------------------------
# simulated raters: a known preference, to check the statistics
# ----------------------------------------------------------------------------------------------------------------------

def default_truth(systems: list[str]) -> dict[str, float]:
    """Log-strengths falling evenly from +0.8 (first system) to -0.8 (last)."""
    return {s: round(0.8 - 1.6 * i / max(1, len(systems) - 1), 4) for i, s in enumerate(systems)}


def simulate(db: Database, experiment: dict, n_raters: int, truth: dict[str, float] | None = None,
             careless_share: float = 0.2, seed: int = 0) -> dict[str, float]:
    """Add `n_raters` synthetic raters who answer every item; returns the log-strengths they follow (same for all
    criteria). Careful raters: tie with TIE_PROBABILITY, else A with probability sigmoid(s_A - s_B); they pass both
    attention checks. Careless ones (a `careless_share` of them) answer at random."""
    truth = dict(truth or default_truth(experiment["systems"]))
    if set(truth) != set(experiment["systems"]):
        raise StudyError(f"--truth must give every system of the experiment: {', '.join(experiment['systems'])}")
    stored = experiment["truth"] or {}
    if stored and stored != truth:
        raise StudyError(f"experiment {experiment['name']!r} already holds raters simulated from {stored}")
    db.execute("UPDATE experiments SET truth = ? WHERE id = ?", (json.dumps(truth), experiment["id"]))
    rng = np.random.default_rng(seed)
    for _ in range(n_raters):
        careless = bool(rng.random() < careless_share)
        with db.write() as conn:  # a rater, its plan and all its answers, or nothing
            token, items = _insert_rater(conn, experiment, True, careless)
            rows = []
            for item_id, _clip, kind, a, b in items:
                item = {"kind": kind, "system_a": a, "system_b": b}
                choice = [_simulated_choice(item, truth, careless, experiment["check_good"], rng) for _ in CRITERIA]
                mos = [None if careless or kind != "pair" else
                       int(np.clip(round(3 + truth[s] * 1.5 + rng.normal(0, 0.7)), 1, 5)) for s in (a, b)]
                rows.append((item_id, *choice, *mos, float(rng.uniform(20, 60)), time.time()))
            conn.executemany(f"INSERT INTO answers (item_id, {', '.join(CRITERIA)}, mos_a, mos_b, seconds, "
                             "answered_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            conn.execute("UPDATE raters SET finished_at = ? WHERE token = ?", (time.time(), token))
    return truth


def _simulated_choice(item: dict, truth: dict, careless: bool, good: str | None, rng: np.random.Generator) -> str:
    if careless:
        return str(rng.choice(["A", "B", "tie"]))
    if item["kind"] == "identical":
        return "tie"
    if item["kind"] == "good_bad":
        return "A" if item["system_a"] == good else "B"
    if rng.random() < TIE_PROBABILITY:
        return "tie"
    p_a = 1 / (1 + math.exp(truth[item["system_b"]] - truth[item["system_a"]]))
    return "A" if rng.random() < p_a else "B"


# ----------------------------------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------------------------------

def load_answers(db: Database, experiment: dict) -> list[dict]:
    """Every answered item of the experiment, with its rater."""
    return db.all("SELECT r.id AS rater, r.simulated, r.careless, i.clip, i.kind, i.system_a, i.system_b, a.* "
                  "FROM answers a JOIN items i ON i.id = a.item_id JOIN raters r ON r.id = i.rater_id "
                  "WHERE r.experiment_id = ? ORDER BY r.id, i.position", (experiment["id"],))


def flagged_raters(answers: list[dict], good: str | None) -> set[int]:
    """Raters who failed an attention check: not tie overall on identical versions, or not `good` for alignment."""
    flagged = set()
    for row in answers:
        if row["kind"] == "identical" and row["overall"] != "tie":
            flagged.add(row["rater"])
        if row["kind"] == "good_bad" and row["alignment"] != ("A" if row["system_a"] == good else "B"):
            flagged.add(row["rater"])
    return flagged


def outcome_arrays(answers: list[dict], systems: list[str], criterion: str) -> tuple[list[int], np.ndarray,
                                                                                       np.ndarray, np.ndarray]:
    """Per rater (R) and ordered system pair (K x K): score of the row system (win 1, tie 0.5), decisive wins, count.
    Returns (rater ids, score [R, K, K], wins [R, K, K], n [R, K, K]); pairs only, attention checks left out."""
    raters = sorted({row["rater"] for row in answers})
    where, index = {r: i for i, r in enumerate(raters)}, {s: i for i, s in enumerate(systems)}
    k = len(systems)
    score, wins, n = (np.zeros((len(raters), k, k)) for _ in range(3))
    for row in answers:
        if row["kind"] != "pair":
            continue
        r, a, b = where[row["rater"]], index[row["system_a"]], index[row["system_b"]]
        choice = row[criterion]
        s_a = {"A": 1.0, "B": 0.0, "tie": 0.5}[choice]
        score[r, a, b] += s_a
        score[r, b, a] += 1 - s_a
        n[r, a, b] += 1
        n[r, b, a] += 1
        if choice != "tie":
            wins[r, a if choice == "A" else b, b if choice == "A" else a] += 1
    return raters, score, wins, n


def bradley_terry(wins: np.ndarray, iterations: int = 500, prior: float = 0.01) -> np.ndarray:
    """Log-strengths [..., K] (centred: mean 0) from win counts [..., K, K] (wins[i, j] = i beat j), by Hunter's (2004)
    MM updates, batched over leading axes. `prior` adds that many wins each way to every pair so a system that never
    lost stays finite."""
    k = wins.shape[-1]
    wins = wins + prior * (1 - np.eye(k))
    games = wins + np.swapaxes(wins, -1, -2)
    total_wins = wins.sum(-1)
    p = np.ones(wins.shape[:-1])
    for _ in range(iterations):
        denom = (games / (p[..., :, None] + p[..., None, :])).sum(-1)
        p = total_wins / denom
        p = p / np.exp(np.log(p).mean(-1, keepdims=True))
    log_p = np.log(p)
    return log_p - log_p.mean(-1, keepdims=True)


def summarise(answers: list[dict], systems: list[str], bootstrap: int, seed: int = 0) -> dict:
    """Win rates with CIs per criterion and pair, Bradley-Terry log-strengths with CIs, MOS per system."""
    rng = np.random.default_rng(seed)
    out = {"criteria": {}, "mos": {}}
    raters = sorted({row["rater"] for row in answers})
    weights = rng.multinomial(len(raters), np.full(len(raters), 1 / len(raters)), size=bootstrap) if raters else None
    for criterion in CRITERIA:
        _, score, wins, n = outcome_arrays(answers, systems, criterion)
        pairs = []
        for i, j in itertools.combinations(range(len(systems)), 2):
            count = n[:, i, j].sum()
            if not count:
                continue
            boot = (weights @ score[:, i, j]) / np.maximum(weights @ n[:, i, j], 1e-9)
            lo, hi = np.percentile(boot, [2.5, 97.5])
            pairs.append({"a": systems[i], "b": systems[j], "n": int(count), "win_rate": score[:, i, j].sum() / count,
                          "ci": (float(lo), float(hi)), "wins": int(wins[:, i, j].sum()),
                          "losses": int(wins[:, j, i].sum()), "ties": int(count - wins[:, i, j].sum()
                                                                           - wins[:, j, i].sum())})
        strength = bradley_terry(wins.sum(0))
        boot = bradley_terry(np.einsum("br,rij->bij", weights, wins)) if raters else np.zeros((1, len(systems)))
        lo, hi = np.percentile(boot, [2.5, 97.5], axis=0)
        order = np.argsort(-strength, kind="stable")
        out["criteria"][criterion] = {
            "pairs": pairs,
            "ranking": [{"system": systems[i], "log_strength": float(strength[i]), "ci": (float(lo[i]), float(hi[i]))}
                        for i in order]}
    for system in systems:
        values = [row[f"mos_{side}"] for row in answers if row["kind"] == "pair"
                  for side in ("a", "b") if row[f"system_{side}"] == system and row[f"mos_{side}"] is not None]
        if values:
            mean, sd = float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
            half = 1.96 * sd / math.sqrt(len(values))
            out["mos"][system] = {"n": len(values), "mean": mean, "ci": (mean - half, mean + half)}
    return out


# ----------------------------------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------------------------------

def report(db: Database, experiment: dict, study: StudyConfig, out: Path) -> dict:
    """Write reports/human_eval.md (+ .png) for `experiment`; returns the summary (also for tests)."""
    answers = load_answers(db, experiment)
    if not answers:
        raise StudyError(f"experiment {experiment['name']!r} has no answers yet")
    raters = db.all("SELECT r.id, r.simulated, r.careless, r.finished_at, COUNT(a.item_id) AS answered, "
                    "COUNT(i.id) AS items FROM raters r JOIN items i ON i.rater_id = r.id "
                    "LEFT JOIN answers a ON a.item_id = i.id WHERE r.experiment_id = ? GROUP BY r.id",
                    (experiment["id"],))
    flagged = flagged_raters(answers, experiment["check_good"])
    kept = [row for row in answers if row["rater"] not in flagged]
    systems = experiment["systems"]
    summary = summarise(kept, systems, study.bootstrap, experiment["seed"])
    summary.update(raters=len({row["rater"] for row in answers}), flagged=sorted(flagged), answers=len(kept),
                   simulated=sum(r["simulated"] for r in raters), truth=experiment["truth"])
    plot = out.with_suffix(".png")
    _plot(summary, systems, plot)
    atomic_write_text(out, _markdown(experiment, summary, raters, plot.name))
    return summary


def _fmt_ci(ci: tuple[float, float], digits: int = 2) -> str:
    return f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _markdown(experiment: dict, s: dict, raters: list[dict], plot: str) -> str:
    complete = sum(r["answered"] == r["items"] for r in raters)
    lines = [f"# Listening test: {experiment['name']}", ""]
    if s["simulated"]:
        lines += [f"> **SIMULATED: {s['simulated']} of {len(raters)} raters are synthetic** (`v2m human-eval create "
                  "--simulate`): they answer from the known preference below. These figures test the statistics; "
                  "they are not a result.", ""]
    lines += [f"Systems: {', '.join(experiment['systems'])}; {len(experiment['clips'])} clips from "
              f"`{experiment['generated_dir']}`. Raters: {len(raters)} ({complete} finished), {s['raters']} with "
              f"answers, {len(s['flagged'])} flagged by the attention checks and left out; {s['answers']} answers "
              "kept. Generated by `v2m human-eval report`; the design and the statistics are described in "
              "`pipeline/human_eval.py` and docs/human-eval.md.", "", f"![win rates and ranking]({plot})", ""]
    for criterion, c in s["criteria"].items():
        lines += [f"## {criterion}", "", "| A | B | n | A wins | B wins | ties | win rate of A | 95 % CI |",
                  "|---|---|---:|---:|---:|---:|---:|---|"]
        lines += [f"| {p['a']} | {p['b']} | {p['n']} | {p['wins']} | {p['losses']} | {p['ties']} | "
                  f"{p['win_rate']:.3f} | {_fmt_ci(p['ci'])} |" for p in c["pairs"]]
        lines += ["", "Bradley-Terry ranking (decisive answers; log-strength, centred):", "",
                  "| rank | system | log-strength | 95 % CI |" + (" true |" if s["truth"] else ""),
                  "|---:|---|---:|---|" + ("---:|" if s["truth"] else "")]
        for rank, r in enumerate(c["ranking"], 1):
            true = f" {s['truth'][r['system']]:+.2f} |" if s["truth"] else ""
            lines.append(f"| {rank} | {r['system']} | {r['log_strength']:+.2f} | {_fmt_ci(r['ci'])} |{true}")
        lines.append("")
    if s["mos"]:
        lines += ["## MOS (optional, 1-5)", "", "| system | n | mean | 95 % CI |", "|---|---:|---:|---|"]
        lines += [f"| {k} | {v['n']} | {v['mean']:.2f} | {_fmt_ci(v['ci'])} |" for k, v in s["mos"].items()]
        lines.append("")
    return "\n".join(lines)


def _plot(s: dict, systems: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2))
    width = 0.8 / len(CRITERIA)
    for k, criterion in enumerate(CRITERIA):
        rank = {r["system"]: r for r in s["criteria"][criterion]["ranking"]}
        x = np.arange(len(systems)) + (k - (len(CRITERIA) - 1) / 2) * width
        y = np.array([rank[name]["log_strength"] for name in systems])
        err = np.array([[y[i] - rank[name]["ci"][0], rank[name]["ci"][1] - y[i]] for i, name in enumerate(systems)]).T
        ax.bar(x, y, width, yerr=np.maximum(err, 0), capsize=2, label=criterion)
    if s["truth"]:
        ax.scatter(np.arange(len(systems)), [s["truth"][name] for name in systems], marker="_", s=600, c="k",
                   zorder=3, label="true (simulated)")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(np.arange(len(systems)), systems)
    ax.set_ylabel("Bradley-Terry log-strength")
    title = "Listening test: ranking per criterion (95 % CI)"
    ax.set_title(title + (" - SIMULATED raters" if s["simulated"] else ""))
    ax.legend(fontsize=8, ncols=5, loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------------

def _truth_arg(text: str) -> dict[str, float]:
    try:
        return {k.strip(): float(v) for k, v in (part.split("=") for part in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected system=log_strength,... got {text!r}") from None


def links(params: Params, path: str) -> str:
    return f"http://{params.serve.host}:{params.serve.port}{path}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="v2m human-eval", description="listening tests: define, invite, report")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--db", help="the app's SQLite file (default: serve.db_path)")
    sub = parser.add_subparsers(dest="action", required=True)
    create = sub.add_parser("create", help="define an experiment from the evaluate stage's renders")
    create.add_argument("name")
    create.add_argument("--generated", help="renders folder (default: serve.study.generated_dir)")
    create.add_argument("--systems", nargs="+", help="systems compared (default: serve.study.systems)")
    create.add_argument("--clips", type=int, help="clips per rater (default: serve.study.max_clips)")
    create.add_argument("--seed", type=int, help="shuffles and attention-check draws (default: base.seed)")
    create.add_argument("--simulate", type=int, default=0, metavar="N",
                        help="add N synthetic raters with a known preference (tests the statistics; not a result)")
    create.add_argument("--truth", type=_truth_arg, help="simulated log-strengths, e.g. full=0.8,no_motion=0")
    create.add_argument("--careless", type=float, default=0.2, help="share of simulated raters answering at random")
    invite = sub.add_parser("invite", help="print personal rater links")
    invite.add_argument("name")
    invite.add_argument("--raters", type=int, default=1)
    rep = sub.add_parser("report", help="win rates, CIs and ranking -> reports/human_eval.md")
    rep.add_argument("name", nargs="?", help="experiment (default: the newest)")
    rep.add_argument("--out", help="markdown path (default: serve.study.report_path)")
    sub.add_parser("list", help="experiments and how far their raters are")
    args = parser.parse_args(argv)
    params = load_params(args.params, missing_ok=True)
    db = Database(args.db or params.serve.db_path)
    study = params.serve.study
    try:
        if args.action == "create":
            study = StudyConfig(**{**study.__dict__, **{k: v for k, v in {
                "generated_dir": args.generated, "systems": tuple(args.systems) if args.systems else None,
                "max_clips": args.clips}.items() if v is not None}})
            seed = params.base.seed if args.seed is None else args.seed
            exp = create_experiment(db, args.name, study, seed)
            print(f"experiment {exp['name']!r}: {len(exp['systems'])} systems x {len(exp['clips'])} clips; "
                  f"raters open {links(params, '/study/' + exp['join_token'])} (with `v2m serve` running)")
            if args.simulate:
                truth = simulate(db, exp, args.simulate, args.truth, args.careless, seed)
                print(f"added {args.simulate} SIMULATED raters following {truth} (tests the statistics, not a result)")
        elif args.action == "invite":
            exp = get_experiment(db, args.name)
            for _ in range(args.raters):
                print(links(params, "/listen/" + add_rater(db, exp)))
        elif args.action == "report":
            exp = get_experiment(db, args.name)
            out = Path(args.out or study.report_path)
            s = report(db, exp, study, out)
            print(f"{out}: {s['raters']} raters ({len(s['flagged'])} flagged), {s['answers']} answers"
                  + (f"; {s['simulated']} SIMULATED" if s["simulated"] else ""))
            for criterion, c in s["criteria"].items():
                print(f"  {criterion:<10} " + " > ".join(f"{r['system']} ({r['log_strength']:+.2f})"
                                                          for r in c["ranking"]))
        else:
            for row in db.all("SELECT e.name, e.join_token, COUNT(DISTINCT r.id) AS raters, "
                              "COUNT(r.finished_at) AS finished FROM experiments e LEFT JOIN raters r "
                              "ON r.experiment_id = e.id GROUP BY e.id ORDER BY e.id"):
                print(f"{row['name']}: {row['raters']} raters, {row['finished']} finished; "
                      f"{links(params, '/study/' + row['join_token'])}")
    except StudyError as exc:
        print(f"v2m human-eval: {exc}", file=sys.stderr)
        return 2
    return 0
