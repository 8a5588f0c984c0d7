"""pipeline/human_eval: the listening test's design (balanced pairing and order, attention checks, stored plans) and
its statistics. The simulated raters test the statistics (the report must recover the preference they were given);
they are not a result."""

from __future__ import annotations

import collections
import itertools
import json
import sqlite3

import numpy as np
import pytest

from pipeline import cli, human_eval
from pipeline.config import StudyConfig
from pipeline.serve.db import Database
from tests.serving import make_renders

SYSTEMS = ("full", "no_motion", "retrieval", "reference")
TRUTH = {"full": 0.9, "no_motion": 0.3, "retrieval": -0.3, "reference": -0.9}


@pytest.fixture(scope="module")
def renders(tmp_path_factory):
    return make_renders(tmp_path_factory.mktemp("renders"), clips=20)


def study(renders, **kw) -> StudyConfig:
    return StudyConfig(generated_dir=str(renders), systems=SYSTEMS, **kw)


def test_every_block_of_2p_raters_sees_each_clip_with_each_pair_in_both_orders(tmp_path, renders):
    db = Database(tmp_path / "db.sqlite")
    exp = human_eval.create_experiment(db, "design", study(renders, max_clips=5), seed=3)
    pairs = list(itertools.combinations(SYSTEMS, 2))
    seen = collections.Counter()
    for idx in range(2 * len(pairs)):
        plan = human_eval.plan_items(exp, idx)
        assert plan == human_eval.plan_items(exp, idx)  # deterministic: the stored plan can be re-derived
        real = [item for item in plan if item[1] == "pair"]
        assert sorted(clip for clip, *_ in real) == exp["clips"]  # every clip once
        kinds = [kind for _, kind, *_ in plan]
        assert sorted(kinds) == ["good_bad", "identical"] + ["pair"] * 5 and kinds[0] == "pair"
        identical = next(item for item in plan if item[1] == "identical")
        assert identical[2] == identical[3]
        good_bad = next(item for item in plan if item[1] == "good_bad")
        assert {good_bad[2], good_bad[3]} == {"reference", "random"}
        seen.update((clip, a, b) for clip, _, a, b in real)
    assert len(seen) == len(exp["clips"]) * len(pairs) * 2 and set(seen.values()) == {1}
    orders = [tuple(item[0] for item in human_eval.plan_items(exp, idx)) for idx in range(4)]
    assert len(set(orders)) == 4  # the clip order is shuffled per rater


def test_raters_store_their_plan_and_take_the_next_index(tmp_path, renders):
    db = Database(tmp_path / "db.sqlite")
    exp = human_eval.create_experiment(db, "plan", study(renders, max_clips=4))
    tokens = [human_eval.add_rater(db, exp) for _ in range(3)]
    assert len(set(tokens)) == 3 and all(len(t) >= 20 for t in tokens)  # 16 random bytes, url-safe
    with sqlite3.connect(db.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert [r[0] for r in conn.execute("SELECT idx FROM raters ORDER BY idx")] == [0, 1, 2]
        stored = conn.execute("SELECT clip, kind, system_a, system_b FROM items i JOIN raters r ON r.id = i.rater_id "
                              "WHERE r.idx = 1 ORDER BY position").fetchall()
    assert stored == human_eval.plan_items(exp, 1)


def test_bradley_terry_recovers_exact_strengths():
    log_p = np.array([0.7, 0.1, -0.2, -0.6])
    p = np.exp(log_p)
    wins = 10_000 * p[:, None] / (p[:, None] + p[None, :]) * (1 - np.eye(4))
    got = human_eval.bradley_terry(wins)
    np.testing.assert_allclose(got, log_p - log_p.mean(), atol=2e-3)
    batch = human_eval.bradley_terry(np.stack([wins, wins.T]))  # batched, and reversed wins reverse the ranking
    np.testing.assert_allclose(batch[1], -(log_p - log_p.mean()), atol=2e-3)


def test_report_recovers_the_simulated_preference(tmp_path, renders):
    """STATISTICS TEST, NOT A RESULT: 60 synthetic raters answer from known Bradley-Terry strengths (a share at
    random); the report must rank the systems as they were given, estimate the strengths, cover them with its
    intervals and flag the careless raters only."""
    db = Database(tmp_path / "db.sqlite")
    exp = human_eval.create_experiment(db, "simulated", study(renders, max_clips=20, bootstrap=500), seed=0)
    human_eval.simulate(db, exp, 60, TRUTH, careless_share=0.2, seed=0)
    exp = human_eval.get_experiment(db, "simulated")
    out = tmp_path / "reports" / "human_eval.md"
    s = human_eval.report(db, exp, study(renders, bootstrap=500), out)
    careless = {r["id"] for r in db.all("SELECT id FROM raters WHERE careless = 1")}
    assert 5 <= len(careless) <= 20
    assert set(s["flagged"]) <= careless and len(set(s["flagged"])) >= 0.8 * len(careless)
    order = sorted(TRUTH, key=TRUTH.get, reverse=True)
    covered = 0
    for criterion in ("quality", "musicality", "alignment", "overall"):
        ranking = s["criteria"][criterion]["ranking"]
        assert [r["system"] for r in ranking] == order, criterion
        for r in ranking:
            assert abs(r["log_strength"] - TRUTH[r["system"]]) < 0.3, (criterion, r)
            covered += r["ci"][0] <= TRUTH[r["system"]] <= r["ci"][1]
        full_vs_ref = next(p for p in s["criteria"][criterion]["pairs"] if {p["a"], p["b"]} == {"full", "reference"})
        expected = 0.8 / (1 + np.exp(-1.8)) + 0.1  # P(win) with 20 % ties counted as half
        assert full_vs_ref["ci"][0] <= expected <= full_vs_ref["ci"][1]
    assert covered >= 14  # of 16: 95 % intervals
    text = out.read_text()
    assert "SIMULATED: 60 of 60 raters are synthetic" in text and "they are not a result" in text
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(s["mos"]) == set(SYSTEMS) and s["mos"]["full"]["mean"] > s["mos"]["reference"]["mean"]


def test_cli_create_simulate_report_and_errors(tmp_path, renders, capsys):
    db, out = str(tmp_path / "db.sqlite"), tmp_path / "he.md"
    base = ["human-eval", "--params", str(tmp_path / "absent.yaml"), "--db", db]
    assert cli.main([*base, "create", "s", "--generated", str(renders), "--systems", *SYSTEMS, "--clips", "6",
                     "--simulate", "8", "--truth", ",".join(f"{k}={v}" for k, v in TRUTH.items())]) == 0
    said = capsys.readouterr().out
    assert "/study/" in said and "SIMULATED" in said
    assert cli.main([*base, "report", "s", "--out", str(out)]) == 0
    assert "8 raters" in capsys.readouterr().out and out.exists()
    assert cli.main([*base, "invite", "s", "--raters", "2"]) == 0
    assert capsys.readouterr().out.count("/listen/") == 2
    assert cli.main([*base, "create", "s", "--generated", str(renders)]) == 2
    assert "exists already" in capsys.readouterr().err
    assert cli.main([*base, "create", "t", "--generated", str(renders), "--systems", "full", "nope"]) == 2
    assert "no renders of nope" in capsys.readouterr().err
    assert cli.main([*base, "create", "u", "--generated", str(renders), "--systems", "full"]) == 2
    assert cli.main([*base, "report", "nope"]) == 2
    assert "no experiment 'nope'" in capsys.readouterr().err
    exp = human_eval.get_experiment(Database(db), "s")
    assert json.loads(json.dumps(exp["truth"])) == TRUTH and len(exp["clips"]) == 6
