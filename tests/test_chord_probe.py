"""scripts/chord_probe.py on real renders and the embedded CLIP encoder: the chord root of a moment can be read from
the nearest CLIP rows of other clips (what the harmony track retrieves), better than a linear read-out."""

from __future__ import annotations

import json

import pytest
import yaml

from pipeline.config import params_from_dict, to_dict
from tests.conftest import load_script


def test_nearest_rows_of_other_clips_name_the_chord_root(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(to_dict(params_from_dict({"embed": {"encoders_dir": str(tmp_path / "enc")}}))))
    out = tmp_path / "probe.json"
    script = load_script("chord_probe")
    assert script.main(["--params", str(params), "--clips", "24", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["clips"] == 24 and result["rows"] == 24 * 16  # 8 s at 2 fps
    assert result["knn1_root"] > 0.45 and result["knn1_root"] > result["linear_root"] + 0.1
    assert result["knn1_key"] > 0.5
    assert not (tmp_path / "enc").exists()  # the seeded encoder went to a scratch folder
    with pytest.raises(SystemExit, match="at least 5"):
        script.main(["--params", str(params), "--clips", "2"])
