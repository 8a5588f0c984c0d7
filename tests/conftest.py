"""Shared fixtures: real media made with ffmpeg lavfi, and the licensed clips in ../shared/data/."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

from pipeline.media import ffmpeg_exe

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the clone (CI has it too). Tests that need it are skipped, with a reason, without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real media not found at {SHARED_DATA} (see docs/testing.md, 'Test data')")
    return SHARED_DATA


def load_script(name: str) -> ModuleType:
    """scripts/{name}.py imported as a module (scripts/ is not a package), so a test can call its main(argv)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ffmpeg(*args: str) -> None:
    """Run the project's ffmpeg; fail the test with ffmpeg's message on error."""
    proc = subprocess.run([ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *args],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def make_video(path: Path, seconds: float = 3.0, size: str = "320x240", rate: str = "25",
               audio: str | None = "sine=frequency=440", extra: list[str] | None = None) -> Path:
    """A testsrc video with an optional lavfi audio source (e.g. 'sine=frequency=440', 'anullsrc=r=8000:cl=mono')."""
    args = ["-f", "lavfi", "-i", f"testsrc=size={size}:rate={rate}:duration={seconds}"]
    if audio:
        args += ["-f", "lavfi", "-t", str(seconds), "-i", audio]
    args += ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"]
    args += ["-c:a", "aac"] if audio else ["-an"]
    args += [*(extra or []), str(path)]
    ffmpeg(*args)
    return path


@pytest.fixture(scope="session")
def trained_project(tmp_path_factory) -> dict:
    """A trained debug model (text on) made by the pipeline's own stages in a temporary folder
    (tests/test_generate.build_project): built once per session for the generate and the serve tests."""
    from tests.test_generate import build_project

    return build_project(tmp_path_factory.mktemp("gen"))
