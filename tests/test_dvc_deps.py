"""dvc.yaml lists every file of the pipeline package that a stage's command runs, so that editing one reruns it.

For each stage (foreach stages expanded), the command `v2m SUB ...` is mapped to its module through
`pipeline.cli.COMMANDS`, and the module's import closure inside the `pipeline` package is computed from the source
(AST, nothing is imported): `import pipeline.x`, `from pipeline.x import y` (y itself a module or not), relative
imports, imports inside functions (the code imports lazily), string registries of the form "pipeline.x[:func]" (the
codecs are imported by name through importlib), the `__init__.py` of every package on the way (Python runs them) and
folders read beside a module (`Path(__file__).parent / "presets"`). Every file of that closure must be in the stage's
deps, as itself or under a listed folder.
"""

from __future__ import annotations

import ast
import re
import shlex
from functools import cache
from pathlib import Path

import pytest

from pipeline.cli import COMMANDS

REPO = Path(__file__).resolve().parents[1]
PKG = "pipeline"
CLI = "pipeline/cli.py"

# Files every stage runs that dvc.yaml deliberately does not list, and why. Listing them would rerun every stage
# (both trainings included) for changes that cannot reach an output.
NOT_LISTED = {
    # The dispatcher: it maps the subcommand to its module through COMMANDS, which this test reads, so a stage that
    # is pointed at other code fails here until dvc.yaml follows. What is left is logging setup, usage text and exit
    # codes. What cli.py imports at module level (pipeline.config) is part of every stage's closure and required.
    CLI: "dispatcher only; its COMMANDS mapping is checked by this test",
    # A docstring and __version__, which only `v2m --version` reads; test_not_listed_files_stay_inert checks that it
    # stays inert (no code, no imports) and that no stage reads a name from it.
    "pipeline/__init__.py": "docstring and __version__ only",
}

# Lazy imports that a stage's command never reaches, as (stage, importing file, enclosing function, module): the
# edge is not followed for that stage. Keep this list short; test_not_run_edges_exist fails on a stale entry.
NOT_RUN = {
    # `v2m evaluate --fit-tagger` returns from fit_tagger() before the report; only model_info() (the parameter
    # counts of Table 1) imports the model. Listing pipeline/model would refit the audio tagger, an evaluation
    # instrument that never sees the V2M model, on every model edit.
    ("tagger", "pipeline/evaluate.py", "model_info", "pipeline.model"),
    # and only `--fit-tagger` runs the music through the codec (evaluate.tagger.round_trip_clips): the stages that
    # score generated music read the tagger it wrote (a dep), never the codec
    *((stage, "pipeline/evaluate.py", func, "pipeline.codecs") for stage in ("evaluate", "evaluate_seeds",
                                                                           "evaluate_all")
      for func in ("codec_round_trips", "_round_trip_job")),
}

REGISTRY_STRING = re.compile(r"pipeline(\.\w+)+(:\w+)?")


# ----------------------------------------------------------------------------------------------------------------------
# the import graph, from source
# ----------------------------------------------------------------------------------------------------------------------

@cache
def module_file(name: str) -> str | None:
    """Repo-relative file of module `name` (a package's __init__.py), or None when it is not a module here."""
    path = REPO.joinpath(*name.split("."))
    if (path / "__init__.py").is_file():
        return str((path / "__init__.py").relative_to(REPO))
    if path.with_suffix(".py").is_file():
        return str(path.with_suffix(".py").relative_to(REPO))
    return None


def module_name(file: str) -> str:
    parts = Path(file).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


class _Imports(ast.NodeVisitor):
    """Every import-like reference in one file, as (module name, kind, enclosing function or "", line); kind is
    "import" or "string" (a registry entry)."""

    def __init__(self, file: str):
        name = module_name(file)
        self.file, self.package = file, name if file.endswith("__init__.py") else name.rpartition(".")[0]
        self.func: list[str] = []
        self.found: list[tuple[str, str, str, int]] = []
        self.data: list[str] = []  # folders or files read beside the module

    def add(self, name: str, kind: str, node: ast.AST) -> None:
        self.found.append((name, kind, ".".join(self.func), node.lineno))

    def visit_FunctionDef(self, node):
        self.func.append(node.name)
        self.generic_visit(node)
        self.func.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Import(self, node):
        for alias in node.names:
            self.add(alias.name, "import", node)

    def visit_ImportFrom(self, node):
        if node.level:  # relative: from . import x, from ..y import z
            base = self.package.split(".")
            base = base[: len(base) - (node.level - 1)]
            mod = ".".join(base + ([node.module] if node.module else []))
        else:
            mod = node.module or ""
        self.add(mod, "import", node)
        for alias in node.names:  # `from pipeline import codecs` names a module; `from x import f` is cut off later
            self.add(f"{mod}.{alias.name}", "import", node)

    def visit_Constant(self, node):
        # "pipeline.cli" is the dispatcher (NOT_LISTED): runtime.local_ranks starts `python -m pipeline.cli STAGE`,
        # the same stage's module again, which is in the closure already; following it would pull in every command
        if isinstance(node.value, str) and REGISTRY_STRING.fullmatch(node.value) and node.value != module_name(CLI):
            self.add(node.value.partition(":")[0], "string", node)

    def visit_BinOp(self, node):
        # Path(__file__).parent / "presets": package data read at run time
        if (isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant)
                and isinstance(node.right.value, str) and "'__file__'" in ast.dump(node.left)):
            self.data.append(str(Path(self.file).parent / node.right.value))
        self.generic_visit(node)


@cache
def scan(file: str) -> tuple[tuple[tuple[str, str, str, int], ...], tuple[str, ...]]:
    """(imports, data paths) of a repo-relative file."""
    visitor = _Imports(file)
    visitor.visit(ast.parse((REPO / file).read_text(encoding="utf-8"), file))
    return tuple(visitor.found), tuple(visitor.data)


def files_of(name: str) -> list[str]:
    """The files Python runs to import `name`: every package __init__.py on the way, then the module."""
    parts = name.split(".")
    out = []
    for i in range(1, len(parts) + 1):
        file = module_file(".".join(parts[:i]))
        if file is None:  # `from pipeline.x import a_function`: the rest is not a module
            break
        out.append(file)
    return out


def closure(stage: str, module: str) -> dict[str, str]:
    """{file: where it is imported from} for what `v2m SUB` runs: `module` and what cli.py imports, transitively."""
    skip = {(file, func, mod) for s, file, func, mod in NOT_RUN if s == stage.partition("@")[0]}
    # cli.py runs first: follow its imports but not its COMMANDS strings, of which only this stage's entry runs
    todo = [(module, f"{CLI} COMMANDS")]
    todo += [(name, f"{CLI}:{line}") for name, kind, _, line in scan(CLI)[0] if kind == "import"]
    seen: dict[str, str] = {}
    while todo:
        name, why = todo.pop()
        if name.split(".")[0] != PKG:
            continue
        for file in files_of(name):
            if file in seen:
                continue
            seen[file] = why
            imports, data = scan(file)
            todo += [(n, f"{file}:{line}") for n, _, func, line in imports
                     if not any(file == f and func.split(".")[0] == fn and (n == m or n.startswith(m + "."))
                                for f, fn, m in skip)]
            for path in data:
                seen.setdefault(path, f"{file} (read at run time)")
    return seen


# ----------------------------------------------------------------------------------------------------------------------
# dvc.yaml
# ----------------------------------------------------------------------------------------------------------------------

def stages() -> dict[str, dict]:
    """dvc.yaml's stages as DVC resolves them (foreach and matrix expanded, ${...} from params.yaml substituted):
    {name: {"cmd": str, "deps": [path as written]}}."""
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        return {stage.addressing: {"cmd": stage.cmd, "deps": [str(d.def_path) for d in stage.deps]}
                for stage in repo.index.stages if stage.cmd}


STAGES = stages()


def module_of(stage: dict) -> str:
    cmd = stage["cmd"] if isinstance(stage["cmd"], str) else " && ".join(stage["cmd"])
    argv = shlex.split(cmd)
    assert argv[0] == "v2m" and len(argv) > 1 and "&&" not in argv, f"not a single `v2m SUB` command: {cmd!r}"
    assert argv[1] in COMMANDS, f"{cmd!r}: {argv[1]!r} is not a v2m subcommand"
    return COMMANDS[argv[1]][0].partition(":")[0]


def code_deps(stage: dict) -> list[str]:
    return [d for d in stage.get("deps", []) if isinstance(d, str) and d.split("/")[0] == PKG]


def covered(file: str, deps: list[str]) -> bool:
    return any(file == d or file.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_cover_its_import_closure(name):
    stage = STAGES[name]
    deps = code_deps(stage)
    runs = closure(name, module_of(stage))
    missing = {f: why for f, why in sorted(runs.items()) if f not in NOT_LISTED and not covered(f, deps)}
    if missing:
        pytest.fail(f"dvc.yaml stage {name!r} (`{stage['cmd']}`) runs files its deps do not list, so editing them "
                    "would not rerun it:\n" + "\n".join(f"  {f}   (imported from {why})" for f, why in missing.items()),
                    pytrace=False)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_listed_code_deps_exist_and_are_run(name):
    """The other way round: a listed file the stage never runs would rerun it (hours, on V2M-20K) for nothing."""
    stage = STAGES[name]
    gone = [d for d in code_deps(stage) if not (REPO / d).exists()]
    assert not gone, f"dvc.yaml stage {name!r} lists code that does not exist: {', '.join(gone)}"
    runs = closure(name, module_of(stage))
    idle = [d for d in code_deps(stage) if not any(covered(f, [d]) for f in runs)]
    assert not idle, f"dvc.yaml stage {name!r} lists code its command never imports: {', '.join(idle)}"


def test_not_listed_files_stay_inert():
    """pipeline/__init__.py runs no code and imports nothing, and no stage reads a name from it."""
    tree = ast.parse((REPO / "pipeline/__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        inert = (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)) or (
            isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant))
        assert inert, f"pipeline/__init__.py:{node.lineno} is code: list it in every stage of dvc.yaml"
    for name, stage in STAGES.items():
        for file in closure(name, module_of(stage)):
            if file == CLI or not file.endswith(".py"):
                continue
            for imported, kind, _, line in scan(file)[0]:
                parent, _, attr = imported.rpartition(".")
                if kind == "import" and parent == PKG and module_file(imported) is None:
                    pytest.fail(f"{file}:{line} reads pipeline.{attr} from pipeline/__init__.py (stage {name}): "
                                "list pipeline/__init__.py in dvc.yaml")


def test_not_run_edges_exist():
    """Every NOT_RUN entry still names a real lazy import, inside that function (else remove the entry)."""
    for stage, file, func, module in NOT_RUN:
        assert any(s.partition("@")[0] == stage for s in STAGES), f"NOT_RUN: no stage {stage!r}"
        funcs = [fn.split(".")[0] for n, kind, fn, _ in scan(file)[0] if n == module or n.startswith(module + ".")]
        assert func in funcs, f"NOT_RUN: {file} {func}() no longer imports {module}"
