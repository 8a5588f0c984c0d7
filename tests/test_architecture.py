"""The import graph is the DVC graph: no stage module imports another stage module, directly or through a library.

A stage's code is its own module plus the shared layers below the stages (config, shards, manifest, runtime, media,
encoders, codecs, model, dataset, inference, metrics), so dvc.yaml can list exactly the files a stage runs and a
change to one stage never reruns another. Every import counts, also those inside functions and relative ones.
`pipeline/cli.py`, the `v2m` dispatcher, imports every stage by name and is exempt.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "pipeline"
STAGES = ("synth", "ingest", "separate", "embed", "tokenize", "train", "generate", "evaluate")
# a stage's own report module counts as the stage; swaps (the DVC stage of the same name) re-renders synth's scores
# with other instruments, so it is SynthV2M's own code too: it may import synth, and no other stage may import it
PART_OF = {"eval_report": "evaluate", "train_report": "train", "swaps": "synth"}
DISPATCHER = PACKAGE / "cli.py"


def stage_of(module: str) -> str | None:
    """The stage a dotted module name belongs to (pipeline.eval_report -> evaluate); None for everything else."""
    parts = module.split(".")
    if len(parts) < 2 or parts[0] != "pipeline":
        return None
    return parts[1] if parts[1] in STAGES else PART_OF.get(parts[1])


def package_of(path: Path, root: Path = REPO) -> str:
    """The dotted package a file's relative imports start from (pipeline/metrics/cli.py -> pipeline.metrics)."""
    return ".".join(path.relative_to(root).with_suffix("").parts[:-1])


def imported_modules(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, dotted module) for every import in the file at any depth: `import a.b`, `from a import b` (both a and
    a.b, since b may be a module), relative imports resolved against `package`, and importlib.import_module("a.b")."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")):
            found.append((node.lineno, node.args[0].value))
    return found


def foreign_stage_imports(path: Path, own: str | None, package: str) -> list[str]:
    """'file:line imports module (stage X)' for each import of a stage other than `own` (None: of any stage)."""
    name = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    seen: dict[tuple[int, str], str] = {}
    for line, module in imported_modules(path, package):
        stage = stage_of(module)
        if stage is not None and stage != own:
            seen.setdefault((line, stage), module)  # `from pipeline.embed import X`: pipeline.embed, once
    return [f"{name}:{line} imports {module} (stage {stage})" for (line, stage), module in sorted(seen.items())]


def stage_files() -> dict[Path, str]:
    """{file: stage} of the stage modules and the report modules that belong to a stage."""
    files = {PACKAGE / f"{stage}.py": stage for stage in STAGES}
    files.update({PACKAGE / f"{name}.py": stage for name, stage in PART_OF.items()
                  if (PACKAGE / f"{name}.py").exists()})
    return files


def test_every_stage_module_exists():
    assert [p.name for p in stage_files() if not p.exists()] == []


def test_no_stage_module_imports_another_stage_module():
    problems = [p for path, stage in stage_files().items() for p in foreign_stage_imports(path, stage, "pipeline")]
    assert not problems, "stage modules import other stages (move what they share into a layer):\n" + "\n".join(
        problems)


def test_no_library_module_imports_a_stage_module():
    """A library that imported a stage would put that stage in the closure of every stage that uses the library."""
    stages = set(stage_files())
    libraries = [p for p in sorted(PACKAGE.rglob("*.py")) if p not in stages and p != DISPATCHER]
    problems = [p for path in libraries for p in foreign_stage_imports(path, None, package_of(path))]
    assert not problems, "library modules import stages:\n" + "\n".join(problems)


def test_the_check_sees_every_kind_of_import(tmp_path):
    module = tmp_path / "pipeline" / "metrics" / "fake.py"
    module.parent.mkdir(parents=True)
    module.write_text(
        "import importlib\n"
        "from pipeline.shards import OK\n"
        "from pipeline import config, ingest\n"
        "def f():\n"
        "    from pipeline.embed import Encoders\n"
        "    from ..eval_report import table\n"
        "    import pipeline.train\n"
        "    return importlib.import_module('pipeline.tokenize')\n")
    package = package_of(module, tmp_path)
    assert package == "pipeline.metrics"
    found = {stage_of(m) for _, m in imported_modules(module, package)} - {None}
    assert found == {"ingest", "embed", "evaluate", "train", "tokenize"}
    problems = foreign_stage_imports(module, "train", package)
    assert [p.split(":")[-1] for p in problems] == [
        "3 imports pipeline.ingest (stage ingest)", "5 imports pipeline.embed (stage embed)",
        "6 imports pipeline.eval_report (stage evaluate)", "8 imports pipeline.tokenize (stage tokenize)"]
