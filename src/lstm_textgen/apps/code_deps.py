"""Which of this project's code each DVC stage runs, so that `dvc.yaml` can declare exactly that.

A stage runs its script and every module of the package that the script imports, directly or not, at
the top of a file or inside a function (a lazy import runs too). The imports are read from the source
(`ast`), not by importing, so nothing runs and a module imported only on some path still counts.
Imports under `if TYPE_CHECKING:` run nothing and do not count; nor does a package's `__init__.py`
that holds only its docstring. Folders are named when the stage runs every module in them."""

from __future__ import annotations

import argparse
import ast
import re
from collections.abc import Iterable
from pathlib import Path

import yaml

PACKAGE = "lstm_textgen"
# Files the package runs by path rather than by import: the registry logs the served model's entry as
# models-from-code, so the registered model runs it (and its imports) wherever it is loaded.
RUN_BY_PATH = {"tracking/registry.py": ("serving/entry.py",)}


def runs_code(path: Path) -> bool:
    """False for a package's `__init__.py` that holds nothing but its docstring."""
    if path.name != "__init__.py":
        return True
    body = ast.parse(path.read_text(encoding="utf-8")).body
    return any(not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)) for node in body)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported_names(tree: ast.AST, module: str) -> Iterable[str]:
    """Dotted names a file imports (for `from a import b`: both `a` and `a.b`, which may be a module)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the importing module's package
                parent = module.split(".")[: -node.level]
                base = ".".join([*parent, *([base] if base else [])])
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)
        stack.extend(ast.iter_child_nodes(node))


def module_file(src: Path, dotted: str) -> Path | None:
    """The file of a dotted module name of the package under `src`, or None (not ours, or a name)."""
    if dotted != PACKAGE and not dotted.startswith(PACKAGE + "."):
        return None
    base = src.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _with_packages(src: Path, path: Path) -> set[Path]:
    """A module and the `__init__.py` of every package above it (Python runs each on import)."""
    files = {path}
    folder = path.parent
    while folder != src:
        files.add(folder / "__init__.py")
        folder = folder.parent
    return {f for f in files if f.is_file() and runs_code(f)}


def import_closure(script: Path, src: Path) -> set[Path]:
    """Every file of the package that running `script` can run, `script` included."""
    seen: set[Path] = set()
    todo = [(script, script.stem)]
    while todo:
        path, module = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = set(_imported_names(tree, module))
        relative = path.relative_to(src / PACKAGE).as_posix() if path.is_relative_to(src / PACKAGE) else ""
        names |= {_dotted(entry) for entry in RUN_BY_PATH.get(relative, ())}
        for name in names:
            found = module_file(src, name)
            if found is not None:
                for file in _with_packages(src, found) - seen:
                    todo.append((file, _module_name(src, file)))
    return {path for path in seen if path == script or runs_code(path)}


def _dotted(relative: str) -> str:
    return ".".join([PACKAGE, *Path(relative).with_suffix("").parts])


def _module_name(src: Path, path: Path) -> str:
    parts = path.relative_to(src).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def code_files(path: Path) -> set[Path]:
    """The Python files a dependency path stands for (a folder: every file below it that runs code)."""
    if path.is_file():
        return {path} if path.suffix == ".py" else set()
    return {p for p in path.rglob("*.py") if "__pycache__" not in p.parts and runs_code(p)}


def stage_scripts(dvc_yaml: Path) -> dict[str, Path]:
    """Each stage's script, from its `cmd: python SCRIPT ...`."""
    stages = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8"))["stages"]
    return {name: dvc_yaml.parent / stage["cmd"].split()[1] for name, stage in stages.items()}


def declared_code(dvc_yaml: Path) -> dict[str, set[Path]]:
    """Each stage's declared code dependencies, folders expanded into their files."""
    stages = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8"))["stages"]
    root = dvc_yaml.parent
    declared = {}
    for name, stage in stages.items():
        paths = [root / (dep if isinstance(dep, str) else next(iter(dep))) for dep in stage.get("deps", [])]
        declared[name] = set().union(*(code_files(p) for p in paths if p.suffix == ".py" or p.is_dir()))
    return declared


def shortest_deps(files: set[Path], top: Path) -> list[Path]:
    """`files` as a list of paths under `top`, naming a folder wherever every file in it is listed."""
    if not top.is_dir():
        return [top] if top in files else []
    if code_files(top) and code_files(top) <= files:
        return [top]
    named: list[Path] = []
    for child in sorted(top.iterdir()):
        if child.name != "__pycache__" and (child.is_dir() or child.suffix == ".py"):
            named += shortest_deps(files, child)
    return named


def stage_code_deps(dvc_yaml: Path, src: Path) -> dict[str, list[str]]:
    """Each stage's code deps as `dvc.yaml` should list them: its script, then the package's paths."""
    root = dvc_yaml.parent
    wanted = {}
    for name, script in stage_scripts(dvc_yaml).items():
        closure = import_closure(script, src)
        package = shortest_deps(closure - {script}, src / PACKAGE)
        wanted[name] = [p.relative_to(root).as_posix() for p in [script, *package]]
    return wanted


def differences(dvc_yaml: Path, src: Path) -> list[str]:
    """One line per code file a stage runs but does not declare, or declares but never runs."""
    root = dvc_yaml.parent
    declared = declared_code(dvc_yaml)
    problems = []
    for name, script in stage_scripts(dvc_yaml).items():
        closure = import_closure(script, src)
        for path in sorted(closure - declared[name]):
            problems.append(f"stage {name}: runs {path.relative_to(root)} but dvc.yaml does not list it")
        for path in sorted(declared[name] - closure):
            problems.append(f"stage {name}: lists {path.relative_to(root)} but never runs it")
    return problems


def rewrite_code_deps(text: str, wanted: dict[str, list[str]]) -> str:
    """dvc.yaml's text with each stage's code deps (its `- stages/` and `- src/` lines) replaced by
    `wanted`, where the first of them stood; every other line and comment is kept as it is."""
    out: list[str] = []
    stage, written = None, set()
    for line in text.splitlines(keepends=True):
        if re.match(r"^  [\w-]+:\s*$", line):  # a stage's name, two spaces in
            stage = line.strip().rstrip(":")
        if stage in wanted and line.strip().startswith(("- stages/", "- src/")):
            if stage not in written:
                indent = line[: len(line) - len(line.lstrip())]
                out += [f"{indent}- {dep}\n" for dep in wanted[stage]]
                written.add(stage)
            continue
        out.append(line)
    return "".join(out)


def update(dvc_yaml: Path = Path("dvc.yaml"), src: Path = Path("src"), check: bool = False) -> int:
    """Rewrite the stages' code deps in `dvc.yaml` from the code; with `check`, only report the
    differences (exit status 1 when there are any)."""
    problems = differences(dvc_yaml, src)
    if check or not problems:
        print("\n".join(problems) or f"{dvc_yaml}: every stage lists exactly the code it runs")
        return 1 if problems else 0
    text = dvc_yaml.read_text(encoding="utf-8")
    dvc_yaml.write_text(rewrite_code_deps(text, stage_code_deps(dvc_yaml, src)), encoding="utf-8")
    print("\n".join(problems) + f"\n{dvc_yaml}: rewritten; `dvc status` shows the stages this re-runs")
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lstm-textgen code-deps", description=__doc__)
    parser.add_argument("--check", action="store_true", help="only report differences (exit status 1 if any)")
    parser.add_argument("--dvc-yaml", type=Path, default=Path("dvc.yaml"))
    parser.add_argument("--src", type=Path, default=Path("src"), help="the folder that holds the package")
    args = parser.parse_args(argv)
    status = update(args.dvc_yaml, args.src, args.check)
    if status:
        raise SystemExit(status)
