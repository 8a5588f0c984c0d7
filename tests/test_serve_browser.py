"""The web app in a real browser: headless Chromium (Debian's chromium + chromium-driver, installed by `make browser`,
which `make test` runs) driven by Selenium, against the app on 127.0.0.1. Upload a real clip and play the scored mp4,
a bad upload's message, a whole listening session (with a pause) landing in SQLite. Screenshots of both pages are
saved to reports/screenshots/ (git-ignored) for a person to look at."""

from __future__ import annotations

import dataclasses
import shutil
import sqlite3
import time
from pathlib import Path

import pytest

from pipeline import human_eval
from pipeline.serve.db import CRITERIA, Database
from tests.serving import ARTIFACTS, make_renders, request, running, serve_params

REAL_CLIP = "videos_with_music/tears_of_steel_2s.webm"


def chromium_paths() -> tuple[str, str] | None:
    browser = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture(scope="module")
def browser():
    paths = chromium_paths()
    if paths is None:
        pytest.skip("headless Chromium not found (chromium + chromedriver on PATH): `make browser` installs the Debian "
                    "packages chromium and chromium-driver, which needs root or passwordless sudo")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = paths[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--mute-audio",
                "--window-size=1200,1000", "--autoplay-policy=no-user-gesture-required", "--no-first-run"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=paths[1]))  # no driver download
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def app(trained_project, tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    params = serve_params(trained_project, root, max_upload_mb=5.0, max_video_seconds=30.0)
    renders = make_renders(root / "generated", clips=3)
    db = Database(params.serve.db_path)
    study = dataclasses.replace(params.serve.study, generated_dir=str(renders), systems=("full", "no_motion"))
    exp = human_eval.create_experiment(db, "browser", study)
    with running(params) as base:
        yield {"base": base, "db": db, "experiment": exp, "root": root}


def wait_for(driver, script: str, timeout: float = 120, *args):
    """Poll a JavaScript expression until it is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(script, *args)
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for: {script}")


def screenshot(driver, name: str) -> Path:
    """The whole page (beyond the window), through the DevTools protocol, as reports/screenshots/{name}."""
    import base64

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}})
    path.write_bytes(base64.b64decode(shot["data"]))
    print(f"screenshot: {path}")
    return path


def test_upload_a_real_clip_and_play_the_scored_mp4(browser, app, shared_data):
    browser.get(app["base"] + "/")
    browser.find_element("id", "video").send_keys(str(shared_data / REAL_CLIP))
    browser.find_element("id", "prompt").send_keys("calm piano")
    seed = browser.find_element("id", "seed")
    seed.clear()
    seed.send_keys("7")
    browser.find_element("id", "submit").click()
    wait_for(browser, "return document.getElementById('step').textContent.length > 0", 30)
    state = wait_for(browser, """
        const v = document.getElementById('result');
        return !v.hidden && v.readyState >= 2 && v.videoWidth > 0 ? [v.duration, v.videoWidth, v.videoHeight] : null;
    """, 180)
    assert abs(state[0] - 2.0) < 0.1 and state[1] > 0
    played = browser.execute_async_script("""
        const done = arguments[arguments.length - 1], v = document.getElementById('result');
        v.muted = true;
        v.play().then(() => setTimeout(() => done([v.currentTime, v.paused, v.error && v.error.code]), 800),
                      (e) => done(['play failed: ' + e.message]));
    """)
    assert isinstance(played[0], float) and played[0] > 0.1 and played[2] is None, played
    browser.execute_script("document.getElementById('result').pause()")
    download = browser.find_element("id", "download").get_attribute("href")
    status, headers, body = request(app["base"], "GET", download.removeprefix(app["base"]))
    assert status == 200 and "attachment" in headers["content-disposition"] and body[4:8] == b"ftyp"
    rows = browser.find_elements("css selector", "#jobs tbody tr")
    assert rows and "tears_of_steel_2s.webm" in rows[0].text and "done" in rows[0].text
    screenshot(browser, "creator.png")


def test_a_bad_upload_shows_its_error_on_the_page(browser, app, tmp_path):
    fake = tmp_path / "holiday.mp4"  # named like a video, but text inside
    fake.write_text("this is a shopping list, not a video\n" * 50)
    browser.get(app["base"] + "/")
    browser.find_element("id", "video").send_keys(str(fake))
    browser.find_element("id", "submit").click()
    message = wait_for(browser, "const e = document.getElementById('error'); return !e.hidden && e.textContent", 30)
    assert message == "holiday.mp4: this is not a video file v2m can read (no known container or codec inside)"
    assert browser.find_element("id", "submit").is_enabled()
    screenshot(browser, "creator_error.png")
    assert request(app["base"], "GET", "/healthz")[0] == 200
    assert not list((app["root"] / "serve" / "uploads").iterdir())


def test_a_whole_listening_session_lands_in_sqlite(browser, app):
    exp = app["experiment"]
    browser.get(f"{app['base']}/study/{exp['join_token']}")
    token = browser.current_url.rsplit("/", 1)[1]
    answered, shot = [], False
    while browser.find_elements("id", "answer"):
        item = int(browser.find_element("name", "item").get_attribute("value"))
        loaded = wait_for(browser, """
            const vs = Array.from(document.querySelectorAll('video[data-side]'));
            return vs.length === 2 && vs.every(v => v.readyState >= 1 && v.duration > 1.5) ? vs.length : 0;
        """, 30)
        assert loaded == 2
        choices = {c: "AB"[(len(answered) + k) % 2] if k != 1 else "tie" for k, c in enumerate(CRITERIA)}
        for criterion, value in choices.items():
            browser.find_element("css selector", f"input[name={criterion}][value={value}]").click()
        browser.find_element("css selector", "select[name=mos_a] option[value='4']").click()
        if not shot:
            screenshot(browser, "listen.png")
            shot = True
        browser.find_element("id", "next").click()
        wait_for(browser, "const i = document.querySelector('input[name=item]'); return !i || i.value !== arguments[0]",
                 30, str(item))
        answered.append((item, choices))
        if len(answered) == 2:  # pause, and resume from the link the pause page gives
            browser.get(f"{app['base']}/listen/{token}/pause")
            assert "2 answers" in browser.find_element("tag name", "main").text
            browser.find_element("id", "resume").click()
    assert "All" in browser.find_element("id", "done").text
    screenshot(browser, "listen_done.png")
    with sqlite3.connect(app["db"].path) as conn:
        conn.row_factory = sqlite3.Row
        rater = conn.execute("SELECT * FROM raters WHERE token = ?", (token,)).fetchone()
        items = conn.execute("SELECT * FROM items WHERE rater_id = ? ORDER BY position", (rater["id"],)).fetchall()
        rows = {r["item_id"]: r for r in conn.execute(
            "SELECT a.* FROM answers a JOIN items i ON i.id = a.item_id WHERE i.rater_id = ?", (rater["id"],))}
    assert rater["finished_at"] is not None and len(items) == len(answered) == len(rows) == 3 + 2  # + the checks
    assert [i["id"] for i in items] == [item for item, _ in answered]  # shown in the stored order
    for item, choices in answered:
        assert {c: rows[item][c] for c in CRITERIA} == choices and rows[item]["mos_a"] == 4
        assert rows[item]["mos_b"] is None and rows[item]["seconds"] > 0
    assert {i["kind"] for i in items} == {"pair", "identical", "good_bad"}
