"""import-v2m: the common layouts of the V2M id lists, with every unusable line reported."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from pipeline import ingest, v2m_ids


@pytest.mark.parametrize("text, expected", [
    ("dQw4w9WgXcQ", "dQw4w9WgXcQ"),
    ("https://www.youtube.com/watch?v=dQw4w9WgXcQ&t=42s", "dQw4w9WgXcQ"),
    ("https://youtu.be/dQw4w9WgXcQ?si=x", "dQw4w9WgXcQ"),
    ("youtube.com/shorts/dQw4w9WgXcQ", "dQw4w9WgXcQ"),
    ("https://m.youtube.com/embed/-_AbCdEfGh1", "-_AbCdEfGh1"),
    ("https://vimeo.com/123", None),
    ("short", None),
])
def test_youtube_id(text, expected):
    assert v2m_ids.youtube_id(text) == expected


def test_lists_in_every_layout_become_one_manifest(tmp_path, capsys):
    (tmp_path / "V2M-20K_train.txt").write_text("# header\ndQw4w9WgXcQ 12.5\nhttps://youtu.be/9bZkp7q19f0\nnope\n")
    (tmp_path / "test.csv").write_text("video_id,start_time\nkJQP7kiw5Fk,30\nkJQP7kiw5Fk,60\n")
    (tmp_path / "splits.json").write_text(json.dumps({"val": ["OPf0YbXqDm0", "OPf0YbXqDm0"]}))
    out = tmp_path / "v2m.csv"
    files = [str(tmp_path / n) for n in ("V2M-20K_train.txt", "test.csv", "splits.json")]
    assert v2m_ids.main([*files, "--out", str(out)]) == 0
    frame = pd.read_csv(out, keep_default_na=False)
    assert list(frame.columns) == ["id", "source", "start_s", "split", "caption", "license"]
    assert list(frame["id"]) == ["yt_dQw4w9WgXcQ", "yt_9bZkp7q19f0", "yt_kJQP7kiw5Fk_30", "yt_kJQP7kiw5Fk_60",
                                 "yt_OPf0YbXqDm0"]
    assert list(frame["split"]) == ["train", "train", "test", "test", "val"]
    assert frame.loc[0, "start_s"] == 12.5
    assert frame.loc[0, "source"] == "https://www.youtube.com/watch?v=dQw4w9WgXcQ"
    err = capsys.readouterr().err
    assert "V2M-20K_train.txt:4: not a YouTube id or URL: 'nope'" in err
    assert "splits.json:2: duplicate of OPf0YbXqDm0" in err
    # every generated id is valid for ingest
    assert all(ingest.ID_RE.match(i) for i in frame["id"])


def test_no_usable_ids_is_an_error(tmp_path):
    (tmp_path / "ids.txt").write_text("not-an-id\n")
    assert v2m_ids.main([str(tmp_path / "ids.txt"), "--out", str(tmp_path / "o.csv")]) == 1
    assert v2m_ids.main([str(tmp_path / "absent.txt"), "--out", str(tmp_path / "o.csv")]) == 2
