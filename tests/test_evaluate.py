"""The evaluate stage: the tagger's held-out accuracy on SynthV2M audio, eval.json's schema, the report."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import yaml

from pipeline.config import BaseConfig, EvaluateConfig, Params, SynthConfig, TaggerConfig, to_dict
from pipeline.metrics import tagger as tagger_lib
from pipeline.synth import labels as synth_labels
from pipeline.synth import make_spec, render_audio

SR = 16000
# Small and fast: 4 s clips, 72 train / 24 held-out, 25 epochs (~20 s on the 2-core reference machine).
TAGGER = TaggerConfig(epochs=25, batch_size=24, crop_s=3.0)
FLOORS = {"instrument": 0.85, "tempo": 0.75, "mode": 0.65, "key": 0.4}  # held-out accuracy the tagger must reach


def _clips(first: int, n: int) -> list[tuple[np.ndarray, dict]]:
    synth, base = SynthConfig(), BaseConfig(clip_seconds=4.0)
    specs = [make_spec(0, i, synth, base) for i in range(first, first + n)]
    return [(render_audio(s, SR), {"id": s.id, **synth_labels(s)}) for s in specs]


@pytest.fixture(scope="module")
def fitted():
    train, held_out = _clips(0, 72), _clips(1000, 24)
    return tagger_lib.fit(train, SR, TAGGER, seed=0, val=held_out), held_out


def test_tagger_reaches_its_held_out_accuracy(fitted, tmp_path):
    model, held_out = fitted
    for head, floor in FLOORS.items():
        assert model.accuracy[head] >= floor, (head, model.accuracy)
    # saved and loaded, it predicts the same; its outputs have the shapes KLD and FAD expect
    model.save(tmp_path / "tagger.pt")
    loaded = tagger_lib.load_tagger(tmp_path / "tagger.pt")
    wav = held_out[0][0]
    assert loaded.predict(wav, SR) == model.predict(wav, SR)
    joint = loaded(wav)
    assert joint.shape == (4 * 12 * 2 * 3,) and np.isclose(np.exp(joint).sum(), 1.0)
    assert loaded.embedder(wav).shape == (2, TAGGER.embedding_dim)  # 3 s windows every 1 s of 4 s


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    """A generate stage's output on 4 SynthV2M test clips (3 s) and the inputs evaluate reads, with the bad input a
    real run meets: no_motion's rows all failed (`no_model`: no checkpoint), retrieval absent, and on the last clip
    random's .wav is garbage and full's is truncated. One train clip is labelled (the baselines' train split)."""
    from pipeline.synth import main as synth_main

    root = tmp_path_factory.mktemp("evaluate")
    params = Params(base=BaseConfig(clip_seconds=3.0), synth=replace(SynthConfig(), width=96, height=96))
    (root / "params.yaml").write_text(yaml.safe_dump(to_dict(params)))
    raw = root / "raw"
    assert synth_main(["--params", str(root / "params.yaml"), "--out", str(raw), "--manifest",
                       str(root / "synth.csv"), "--n", "4", "--no-preview"]) == 0
    frame = pd.read_csv(root / "synth.csv", dtype={"key": str})
    frame["split"], frame["status"] = "test", "ok"
    ingest = root / "ingest"
    (ingest / "clips").mkdir(parents=True)
    music, gen = root / "music", root / "generated"
    music.mkdir()
    ids = list(frame["id"])
    rows = []
    for k, i in enumerate(ids):
        shutil.copy(raw / f"{i}.mp4", ingest / "clips" / f"{i}.mp4")
        spec = make_spec(0, int(i.split("_")[1]), params.synth, params.base)
        y = render_audio(spec, 32000)
        sf.write(music / f"{i}.wav", y, 32000)
        other = render_audio(make_spec(0, 50 + k, params.synth, params.base), 32000)
        for system, audio in (("reference", y), ("full", np.roll(y, 320)), ("random", other)):
            (gen / system).mkdir(parents=True, exist_ok=True)
            sf.write(gen / system / f"{i}.wav", audio, 32000)
            rows.append({"system": system, "id": i, "status": "ok", "reason": "", "error": ""})
        rows.append({"system": "no_motion", "id": i, "status": "failed", "reason": "no_model",
                     "error": "models/no_motion/v2m.pt: no checkpoint"})
    bad = ids[-1]
    (gen / "random" / f"{bad}.wav").write_bytes(b"RIFF\x00\x00garbage" * 8)  # unreadable
    full_bad = gen / "full" / f"{bad}.wav"
    full_bad.write_bytes(full_bad.read_bytes()[:20000])  # a cut-off write: 0.3 s of 3 s
    pd.DataFrame(rows).to_csv(gen / "manifest.csv", index=False)
    train = frame.iloc[[0]].assign(id="synth_train", split="train")
    pd.concat([frame, train]).to_parquet(ingest / "manifest.parquet")
    cfg = replace(EvaluateConfig(), generated_dir=str(gen), music_dir=str(music), ingest_dir=str(ingest),
                  models_dir=str(root / "models"), metrics_path=str(root / "metrics/eval.json"),
                  report_path=str(root / "reports/eval.md"), bootstrap=50, workers=1,
                  flow_cache=str(root / "flow"), tagger=replace(TAGGER, out_dir=str(root / "models/tagger"),
                                                                metrics_path=str(root / "tagger.json")))
    (root / "params.yaml").write_text(yaml.safe_dump(to_dict(replace(params, evaluate=cfg))))
    return root, ids, params, cfg


@pytest.fixture(scope="module")
def evaluated(fitted, stage):
    from pipeline import evaluate

    root, ids, _, cfg = stage
    fitted[0].save(root / "models/tagger/tagger.pt")
    assert evaluate.main(["--params", str(root / "params.yaml")]) == 0
    return root, ids, json.loads((root / "metrics/eval.json").read_text()), (root / "reports/eval.md").read_text()


def test_evaluate_writes_schema_and_report(evaluated):
    from pipeline import eval_report

    root, ids, report, text = evaluated
    assert report["n_clips"] == 3 and report["embedding"] == "tagger"
    assert set(report["systems"]) == {"reference", "full", "random"}
    assert set(report["missing"]) == {"no_motion", "retrieval"}
    for values in report["systems"].values():
        for metric in ("fad_tagger", "kld_pq_tagger", "kld_qp_tagger", "chroma", "av_align", "beat_f1", "tempo_acc",
                       "key_acc", "instrument_acc"):
            lo, hi = values[metric + "_ci"]
            assert isinstance(values[metric], float) and lo <= hi, metric
    ref, rnd = report["systems"]["reference"], report["systems"]["random"]
    assert ref["chroma"] > 0.99 and abs(ref["kld_pq_tagger"]) < 1e-3  # itself (eps 1e-6 makes it -3e-4)
    assert rnd["chroma"] < ref["chroma"] and rnd["kld_pq_tagger"] > ref["kld_pq_tagger"]
    # the baselines learn nothing but draw from the train split (1 clip here); the trained systems count it too
    assert report["models"]["random"] == {"params": 0, "train_samples": 1}
    assert report["models"]["full"] == {"params": None, "train_samples": 1}
    assert "| Random baseline | 0 (no learning) | 1 |" in text

    assert "| Model | Params | Training samples | FAD (tagger) ↓" in text and "Where the demo stands" in text
    for name in ("distributions", "alignment", "chroma"):
        assert (root / f"reports/eval_{name}.png").stat().st_size > 1000
    assert eval_report.print_table(root / "reports/eval.md") == 0


def test_report_quotes_the_papers_table_1_apart_and_explains_fad(evaluated):
    """The published rows are ../shared/PAPER.md's, cell for cell, in their own section after our table; the FAD note
    is there because the embedding is the tagger."""
    text = evaluated[3]
    ours, published = text.split("## Published figures: the paper's Table 1, quoted (not our measurements)")
    assert "VidMuse" not in ours and "Model-S" not in ours
    paper = Path(__file__).resolve().parents[2] / "shared" / "PAPER.md"
    if paper.exists():  # beside the clone, as in CI: every published row appears in the report as the paper has it
        rows = [line for line in paper.read_text().splitlines() if line.startswith(("| VidMuse-M", "| Model-S"))]
        assert len(rows) == 3
        for row in rows:
            assert row in published, row
    assert "| VidMuse-M (baseline) | 1.9B | 360k | 2.13 | 1.32 | 0.98 | 0.056 |" in published
    assert "Why random music has the best FAD above" in published and "melvq codec" in published


def test_evaluate_leaves_out_a_system_whose_rows_all_failed(evaluated):
    _, ids, report, text = evaluated
    assert "no_model" in report["missing"]["no_motion"] and "no checkpoint" in report["missing"]["no_motion"]
    assert "- system no_motion: all 4 test rows of" in text
    # its failed rows drop no clip: the other systems are scored on every clip they could all be scored on
    assert not any(p.startswith("no_motion") for why in report["problems"].values() for p in why)
    assert all(set(clips) == set(ids[:3]) for clips in report["per_clip"].values())


def test_evaluate_drops_an_unscorable_clip_for_every_system(evaluated):
    root, ids, report, text = evaluated
    bad = ids[-1]
    assert list(report["problems"]) == [bad]
    random_problem, full_problem = sorted(report["problems"][bad], key=lambda p: not p.startswith("random"))
    assert random_problem.startswith(f"random: unreadable: {root / 'generated/random' / bad}.wav: audio cannot be")
    assert full_problem.startswith(f"full: {root / 'generated/full' / bad}.wav: generated is shorter than the refer")
    assert all(bad not in clips for clips in report["per_clip"].values())
    line = next(line for line in text.splitlines() if line.startswith(f"- clip {bad}: "))  # under "Not scored"
    assert "full: " in line and "generated is shorter" in line and "random: unreadable" in line


def test_select_clips_drops_a_clip_only_for_a_present_system(stage, tmp_path):
    from pipeline import evaluate

    root, ids, _, cfg = stage
    gen = tmp_path / "generated"
    shutil.copytree(root / "generated", gen)
    rows = pd.read_csv(gen / "manifest.csv", dtype=str, keep_default_na=False)
    rows.loc[(rows["system"] == "full") & (rows["id"] == ids[0]), ["status", "reason"]] = ["failed", "oom"]
    rows.to_csv(gen / "manifest.csv", index=False)
    (gen / "reference" / f"{ids[1]}.wav").unlink()
    labels = evaluate.read_labels(root / "ingest")
    selected, missing, problems = evaluate.select_clips(replace(cfg, generated_dir=str(gen)), labels)
    assert selected == ids[2:] and set(missing) == {"no_motion", "retrieval"}
    assert problems == {ids[0]: ["full: failed (oom)"], ids[1]: [f"reference: no {gen / 'reference' / ids[1]}.wav"]}
    # every system failed everywhere: all missing, nothing to score, no clip blamed
    rows["status"] = "failed"
    rows.to_csv(gen / "manifest.csv", index=False)
    selected, missing, problems = evaluate.select_clips(replace(cfg, generated_dir=str(gen)), labels)
    assert selected == [] and set(missing) == set(cfg.systems) and problems == {}


def test_evaluate_without_a_tagger_or_with_a_bad_setting_says_what_to_do(stage, tmp_path, capsys):
    from pipeline import evaluate

    root, _, params, cfg = stage
    no_tagger = replace(cfg, tagger=replace(cfg.tagger, out_dir=str(tmp_path / "models/tagger")),
                        metrics_path=str(tmp_path / "eval.json"))
    for name, evaluate_cfg, code, wanted in (
            ("no_tagger", no_tagger, 1, f"{tmp_path / 'models/tagger/tagger.pt'}: no fitted tagger; run `v2m evaluate "
                                        "--fit-tagger` (DVC stage `tagger`) first"),
            ("bad_embedding", replace(no_tagger, embedding="passt"), 2, "evaluate.embedding must be tagger or vggish")):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(to_dict(replace(params, evaluate=evaluate_cfg))))
        assert evaluate.main(["--params", str(path)]) == code
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("v2m evaluate:")]  # logging may add others
        assert len(lines) == 1 and wanted in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "eval.json").exists()


def test_seed_summary_gives_mean_sd_worst_and_checks_every_target_on_every_seed():
    from pipeline import eval_report

    def seed(beat, tempo, key, fad, beat_nm):
        return {"full": {"beat_f1": beat, "tempo_acc": tempo, "key_acc": key, "fad_tagger": fad},
                "no_motion": {"beat_f1": beat_nm, "tempo_acc": 0.1, "key_acc": key, "fad_tagger": fad}}

    summary = eval_report.seed_summary({0: seed(0.9, 1.0, 0.9, 70.0, 0.1), 1: seed(0.86, 0.95, 0.85, 80.0, 0.2),
                                        2: seed(0.95, 0.9, 0.8, 60.0, 0.7)}, "tagger")
    beat = summary["systems"]["full"]["beat_f1"]
    assert beat["per_seed"] == {0: 0.9, 1: 0.86, 2: 0.95} and beat["mean"] == 0.9033 and beat["worst"] == 0.86
    assert beat["sd"] == round(float(np.std([0.9, 0.86, 0.95], ddof=1)), 4)
    assert summary["systems"]["full"]["fad_tagger"]["worst"] == 80.0  # lower is better: the worst is the highest
    met = {t["target"]: t["met"] for t in summary["targets"]}
    assert met == {"full beat F1 >= 0.85": True, "full tempo accuracy >= 0.9": True,
                   "full key accuracy >= 0.85": False,  # seed 2's 0.8
                   "no_motion beat F1 >= 0.3 below full": False}  # seed 2's gap 0.25
    assert not summary["all_met"]
    table = eval_report.seed_table(summary)
    assert "| full key accuracy >= 0.85 | 0.900 | 0.850 | 0.800 | **no** |" in table


def test_evaluate_seeds_scores_each_training_seed(fitted, stage, tmp_path, capsys):
    """`v2m evaluate --seeds DIR`: base.seed's systems from the generated dir, seed 1's from DIR/1."""
    from pipeline import evaluate
    from pipeline.config import SeedStudyConfig

    root, ids, params, cfg = stage
    fitted[0].save(root / "models/tagger/tagger.pt")
    gen, seeds = tmp_path / "generated", tmp_path / "seeds"
    rows = []
    for i in ids[:3]:
        reference = root / "generated/reference" / f"{i}.wav"
        for folder, system, source in ((gen, "full", root / "generated/full" / f"{i}.wav"),
                                       (gen, "no_motion", root / "generated/random" / f"{i}.wav"),
                                       (seeds / "1", "full", reference), (seeds / "1", "no_motion", reference)):
            (folder / system).mkdir(parents=True, exist_ok=True)
            shutil.copy(source, folder / system / f"{i}.wav")
            rows.append({"folder": folder, "system": system, "id": i, "status": "ok", "reason": "", "error": ""})
    for folder in (gen, seeds / "1"):
        pd.DataFrame([{k: v for k, v in r.items() if k != "folder"} for r in rows if r["folder"] == folder]) \
            .to_csv(folder / "manifest.csv", index=False)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(to_dict(replace(params, evaluate=replace(cfg, generated_dir=str(gen)),
                                                   seed_study=SeedStudyConfig(seeds=(1,))))))
    out = ["--metrics", str(tmp_path / "seeds.json"), "--report", str(tmp_path / "seeds.md")]
    assert evaluate.main(["--params", str(path), "--seeds", str(seeds), *out]) == 0
    summary = json.loads((tmp_path / "seeds.json").read_text())
    assert summary["seeds"] == [0, 1] and set(summary["systems"]) == {"full", "no_motion"}
    chroma = summary["systems"]["full"]["chroma"]["per_seed"]
    assert chroma["1"] > 0.99 and chroma["0"] < chroma["1"]  # seed 1's "full" is the reference itself
    assert len(summary["targets"]) == 4 and summary["all_met"] == all(t["met"] for t in summary["targets"])
    assert "# The seed study" in (tmp_path / "seeds.md").read_text()

    shutil.rmtree(seeds / "1")
    assert evaluate.main(["--params", str(path), "--seeds", str(seeds), *out]) == 1
    assert f"seed 1: nothing to score in {seeds / '1'}" in capsys.readouterr().err


def test_ablation_summary_averages_seeds_per_resample_and_tests_each_claim():
    """Each cell: the seed mean, its CI from the seed mean on each resample; per-seed values, sd, worst; a claim that
    a beats b is confirmed only when a wins on every seed and the CI of the difference is above 0; a claim that less
    data does as well is consistent while that CI reaches 0."""
    from pipeline import eval_report
    from pipeline.config import AblationsConfig

    rng = np.random.default_rng(0)

    def runs(centre: float) -> dict:
        return {"beat_f1": list(centre + 0.02 * rng.standard_normal(201)), "key_acc": [centre] * 201,
                "chroma": list(0.5 + 0.01 * rng.standard_normal(201))}

    stats = {}
    for seed, shift in ((0, 0.0), (1, 0.02), (2, -0.01)):
        stats[(seed, "full")] = runs(0.9 + shift)
        stats[(seed, "no_motion")] = runs(0.2 + shift)
        stats[(seed, "data50")] = runs(0.9 + shift)  # as good as full: enough data
        stats[(seed, "data25")] = runs(0.6 + shift)  # clearly worse
        stats[(seed, "spatial")] = runs(0.95 + shift)  # better than the temporal fusion
    stats[(None, "random")] = runs(0.1)
    ab = AblationsConfig(seeds=(0, 1, 2), systems=(), fractions=(25, 50))
    summary = eval_report.ablation_summary(stats, [0, 1, 2], "tagger", {"full": 320, "no_motion": 320,
                                                                         "data50": 160, "data25": 80, "random": 320,
                                                                         "spatial": 320}, 20, ab)
    assert list(summary["systems"]) == ["full", "no_motion", "spatial", "data50", "data25", "random"]
    beat = summary["systems"]["full"]["beat_f1"]
    per_seed = [stats[(s, "full")]["beat_f1"][0] for s in (0, 1, 2)]
    assert beat["mean"] == round(float(np.mean(per_seed)), 4) and beat["worst"] == round(min(per_seed), 4)
    assert beat["sd"] == round(float(np.std(per_seed, ddof=1)), 4)
    seed_mean = np.mean([stats[(s, "full")]["beat_f1"] for s in (0, 1, 2)], axis=0)
    assert beat["ci"] == [round(float(x), 4) for x in np.percentile(seed_mean[1:], [2.5, 97.5])]
    assert "per_seed" not in summary["systems"]["random"]["beat_f1"] and summary["systems"]["random"]["seeds"] == []
    verdicts = {(c["b"], c["metric"]): c["verdict"] for c in summary["claims"]}
    assert verdicts[("no_motion", "beat_f1")] == "confirmed"
    assert verdicts[("data25", "beat_f1")] == "contradicted"  # 100 % clearly beats 25 %: size still matters
    assert verdicts[("data50", "key_acc")] == "consistent"  # identical: no gain from doubling the data
    assert verdicts[("full", "key_acc")] == "contradicted"  # conclusion 3: here the spatial fusion is better
    assert ("no_clip", "key_acc") not in verdicts  # systems that were not trained are not claimed about
    assert summary["data_size"]["train_clips"] == [80, 160, 320]
    assert summary["data_size"]["metrics"]["key_acc"]["mean"] == [0.6033, 0.9033, 0.9033]
    table = eval_report.ablation_table(summary)
    assert "| v2m full on 25 % of the train split | 80 | 3 |" in table and "– (no training)" in table


def test_evaluate_ablations_scores_every_system_and_seed_on_the_same_clips(fitted, stage, tmp_path, capsys):
    """`v2m evaluate --ablations DIR`: full / no_motion of seed 0 from the generated dir and of seed 1 from the seed
    study's, the group's systems from DIR/{seed}; one table, the claims and the data-size plot."""
    from pipeline import evaluate
    from pipeline.config import AblationsConfig, SeedStudyConfig

    root, ids, params, cfg = stage
    fitted[0].save(root / "models/tagger/tagger.pt")
    gen, seeds, abl = tmp_path / "generated", tmp_path / "seeds", tmp_path / "ablations"
    reference, other, rolled = (root / "generated/reference", root / "generated/random", root / "generated/full")
    layout = {gen: {"reference": reference, "random": other, "full": reference, "no_motion": other},
              seeds / "1": {"full": reference, "no_motion": other},
              abl / "0": {"no_clip": other, "data50": rolled}, abl / "1": {"no_clip": other, "data50": reference}}
    # the text model's three rows: the true music each time; text_other's prompt names another instrument, so
    # against its prompt it scores what the tagger gets wrong on the true music
    labels = pd.read_parquet(root / "ingest/manifest.parquet").set_index("id")
    others = {i: next(x for x in ("piano", "organ", "pluck", "bell") if x != labels.loc[i, "instrument"])
              for i in ids[:3]}
    for seed in ("0", "1"):
        layout[abl / seed].update({"text": reference, "text_own": reference, "text_other": reference})
    for folder, systems in layout.items():
        rows = []
        for system, source in systems.items():
            (folder / system).mkdir(parents=True)
            for i in ids[:3]:
                shutil.copy(source / f"{i}.wav", folder / system / f"{i}.wav")
                rows.append({"system": system, "id": i, "status": "ok", "reason": "", "error": ""})
                if system.startswith("text"):
                    rows[-1]["prompt_instrument"] = others[i] if system == "text_other" else labels.loc[
                        i, "instrument"]
        pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    path = tmp_path / "params.yaml"
    ablations = AblationsConfig(seeds=(0, 1), systems=("no_clip",), fractions=(50,), spatial=False)
    path.write_text(yaml.safe_dump(to_dict(replace(params, evaluate=replace(cfg, generated_dir=str(gen)),
                                                   seed_study=SeedStudyConfig(seeds=(1,)), ablations=ablations))))
    out = ["--metrics", str(tmp_path / "ablations.json"), "--report", str(tmp_path / "reports" / "ablations.md"),
           "--seeds-dir", str(seeds)]
    assert evaluate.main(["--params", str(path), "--ablations", str(abl), *out]) == 0
    summary = json.loads((tmp_path / "ablations.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["n_clips"] == 3
    assert set(summary["systems"]) == {"full", "no_motion", "no_clip", "text", "text_own", "text_other", "data50",
                                       "reference", "random"}
    inst = {s: summary["systems"][s]["instrument_acc"]["mean"] for s in ("text", "text_own", "text_other")}
    assert inst["text"] == inst["text_own"] >= 0.66 and inst["text_other"] <= 1 - inst["text_own"]  # vs the prompt
    steering = {t["system"]: t for t in summary["steering"]}
    assert set(steering) == {"text_own", "text_other"} and not steering["text_other"]["met_every_seed"]
    assert summary["systems"]["full"]["chroma"]["mean"] > 0.99  # "full" is the reference music on both seeds
    assert summary["systems"]["data50"]["train_clips"] == 1  # 50 % of the one labelled train clip, at least one
    claims = {(c["b"], c["metric"]): c for c in summary["claims"]}
    assert claims[("no_clip", "chroma")]["verdict"] == "confirmed"
    assert set(claims[("no_clip", "chroma")]["per_seed"]) == {"0", "1"}
    text = (tmp_path / "reports" / "ablations.md").read_text()
    cells = [line[2:].split(" | ") for line in text.split("## The paper")[0].splitlines() if line.startswith("| v2m")]
    assert [(c[0], c[2]) for c in cells] == [("v2m full (CLIP + flow)", "2"), ("v2m no_motion (CLIP only)", "2"),
                                             ("v2m no_clip (flow only)", "2"), ("v2m text, no prompt", "2"),
                                             ("v2m text, prompt = the clip's instrument", "2"),
                                             ("v2m text, prompt = another instrument (scored against the prompt)",
                                              "2"),
                                             ("v2m full on 50 % of the train split", "2")]  # in table order, 2 seeds
    assert "## Text steering" in text and "| another instrument | beat F1 >= 0.8 |" in text
    own = [line for line in text.splitlines() if line.startswith("| the clip's instrument | instrument acc")]
    assert own and own[0].endswith(" | yes |") == (min(steering["text_own"]["instrument_acc"].values()) >= 0.9)
    assert "Both targets on every seed: the clip's instrument: **" in text and "another instrument: **no**." in text
    assert "## The paper's claims, tested" in text and "![data-size curve](data_size.png)" in text
    assert (tmp_path / "reports" / "data_size.png").read_bytes()[:4] == b"\x89PNG"

    shutil.rmtree(abl / "1" / "no_clip")
    assert evaluate.main(["--params", str(path), "--ablations", str(abl), *out]) == 1
    assert f"seed 1: nothing to score in {abl / '1'} (no_clip: no generated music" in capsys.readouterr().err
    path.write_text(yaml.safe_dump(to_dict(replace(params, evaluate=replace(cfg, generated_dir=str(gen)),
                                                   seed_study=SeedStudyConfig(seeds=(1,)),
                                                   ablations=replace(ablations, seeds=(0, 2))))))
    assert evaluate.main(["--params", str(path), "--ablations", str(abl), *out]) == 2
    assert "ablations.seeds [0, 2] must be base.seed and seed_study.seeds [0, 1]" in capsys.readouterr().err


def test_round_trip_rows_take_each_instrument_alike_in_a_fixed_order():
    from pipeline.evaluate import round_trip_rows

    rows = [{"id": f"synth_{i:05d}", "instrument": ("piano", "organ", "pluck", "bell")[i % 4 if i < 30 else 0]}
            for i in range(40)]
    chosen = round_trip_rows(rows, 8)
    assert len(chosen) == 8 and pd.Series([r["instrument"] for r in chosen]).value_counts().to_dict() == {
        "bell": 2, "organ": 2, "piano": 2, "pluck": 2}
    assert chosen == round_trip_rows(list(reversed(rows)), 8)  # the order of the input does not matter
    assert {r["id"] for r in round_trip_rows(rows, 4)} <= {r["id"] for r in chosen}  # a smaller set is inside


def test_tagger_also_learns_from_the_codec_round_trip(trained_project, tmp_path, capsys):
    """evaluate.tagger.round_trip_clips: the tagger stage runs that many train clips through the tokenize stage's
    codec (exactly the reference row's encode + decode) and trains on them too; the held-out round trip accuracy is
    reported. Without the codec it says what to run."""
    from pipeline import codecs, evaluate
    from pipeline.config import load_params
    from pipeline.media import load_audio
    from pipeline.metrics.tagger import resample

    params = yaml.safe_load(trained_project["params"].read_text())
    params["evaluate"]["tagger"].update(out_dir=str(tmp_path / "tagger"), metrics_path=str(tmp_path / "tagger.json"),
                                       epochs=2, round_trip_clips=4, round_trip_workers=1)
    params["evaluate"].update(ingest_dir=params["ingest"]["out_dir"], music_dir=params["separate"]["out_dir"])
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    assert evaluate.main(["--params", str(path), "--fit-tagger"]) == 0
    result = json.loads((tmp_path / "tagger.json").read_text())
    assert result["train_clips"] == 6 and result["round_trip_clips"] == 4
    assert set(result["val_round_trip_accuracy"]) == set(result["val_accuracy"])
    loaded = load_params(path)
    labels = evaluate.read_labels(Path(loaded.evaluate.ingest_dir))
    row = labels[labels["split"] == "val"].to_dict("records")[0]
    got = evaluate.codec_round_trips(loaded, loaded.evaluate.music_dir, [row], 16000, 1)[0]
    codec = codecs.load_codec(loaded.tokenize.codec, loaded.tokenize)
    music = load_audio(Path(loaded.evaluate.music_dir) / f"{row['id']}.wav", codec.sample_rate)[0]
    want = resample(codec.decode(codec.encode(music)), codec.sample_rate, 16000)
    assert np.array_equal(got, want)
    assert np.array_equal(codecs.round_trip(codec, Path(loaded.evaluate.music_dir) / f"{row['id']}.wav"),
                          codec.decode(codec.encode(music)))  # the helper the generate stage's reference row uses
    rows = labels.to_dict("records")[:4]  # in 2 processes: the same round trips, in order (BLAS threads aside)
    one = evaluate.codec_round_trips(loaded, loaded.evaluate.music_dir, rows, 16000, 1, [2.0] * 4)
    two = evaluate.codec_round_trips(loaded, loaded.evaluate.music_dir, rows, 16000, 2, [2.0] * 4)
    assert [len(w) for w in one] == [32000] * 4 and all(np.allclose(a, b, atol=1e-5) for a, b in zip(one, two,
                                                                                                  strict=True))
    params["tokenize"]["model_dir"] = str(tmp_path / "no_codec")
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.raises(SystemExit, match="round_trip_clips needs the tokenize stage's codec"):
        evaluate.main(["--params", str(path), "--fit-tagger"])
