"""Each stage of dvc.yaml depends on every project module its command imports: editing any of them
re-runs the stage. The imports are read from the source (those inside functions too), from the
stage's entry module through ``pipeline``, ``sasa`` and relative imports, packages' ``__init__``
included."""

import ast
import re
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO

STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]

# Imports that cannot change a stage's outputs, not followed: prepare validates params.yaml with the
# architecture schema, which asks sasa which models exist and builds each one on the meta device, but
# writes nothing of them; depending on sasa would decode every image of an image folder again
# whenever model code changes.
NOT_FOLLOWED = {"prepare": {("pipeline.arch_config", "sasa")}}


def module_file(name: str) -> Path | None:
    """The repository's file of module ``name`` (a package's ``__init__.py``), or None if it is not the project's."""
    base = REPO.joinpath(*name.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _imports_every_submodule(call: ast.Call) -> bool:
    """``pkgutil.iter_modules(__path__)``: a package that imports each of its modules by name."""
    func = call.func
    return (
        isinstance(func, ast.Attribute)
        and func.attr == "iter_modules"
        and any(isinstance(arg, ast.Name) and arg.id == "__path__" for arg in call.args)
    )


def imported_names(name: str, path: Path) -> set[str]:
    """Every module ``path`` (module ``name``) may import, with the packages above each one."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join([*parts[: len(parts) - node.level + 1], *([node.module] if node.module else [])])
            else:
                base = node.module
            found |= {base, *(f"{base}.{alias.name}" for alias in node.names)}  # a name may be a submodule
        elif isinstance(node, ast.Call) and _imports_every_submodule(node):
            found |= {f"{package}.{p.stem}" for p in path.parent.glob("*.py") if p.name != "__init__.py"}
    parts = {".".join(n.split(".")[:i]) for n in found for i in range(1, n.count(".") + 2)}
    return {n for n in parts if module_file(n)}


def closure(entries: list[str], not_followed=frozenset()) -> dict[Path, str]:
    """Each project module file the entry modules reach, with the module that first imported it."""
    reached = {module_file(entry): "the stage's command" for entry in entries}
    todo = list(entries)
    while todo:
        name = todo.pop()
        for found in sorted(imported_names(name, module_file(name))):
            if any(name == src and (found == dst or found.startswith(f"{dst}.")) for src, dst in not_followed):
                continue
            path = module_file(found)
            if path not in reached:
                reached[path] = name
                todo.append(found)
    return reached


def entry_modules(cmd: str) -> list[str]:
    """``python -m pipeline.X``: the module, or the package and its ``__main__``."""
    name = re.search(r"python -m ([\w.]+)", cmd).group(1)
    path = module_file(name)
    assert path, f"{cmd}: no module {name} in the repository"
    main = f"{name}.__main__"
    return [name, main] if path.name == "__init__.py" and module_file(main) else [name]


def _stage(name: str) -> dict:
    return STAGES[name].get("do", STAGES[name])  # a foreach stage's template


def _covers(dep: str, path: Path) -> bool:
    target = REPO / dep
    return path == target or target in path.parents


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_depends_on_every_module_its_command_imports(stage):
    spec = _stage(stage)
    reached = closure(entry_modules(spec["cmd"]), NOT_FOLLOWED.get(stage, frozenset()))
    missing = [
        f"{path.relative_to(REPO)} (imported by {importer})"
        for path, importer in reached.items()
        if not any(_covers(dep, path) for dep in spec["deps"])
    ]
    assert not missing, f"dvc.yaml stage {stage}: add to deps: {', '.join(missing)}"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_depends_on_no_code_its_command_does_not_import(stage):
    """A code dependency that the stage never imports re-runs it for nothing."""
    spec = _stage(stage)
    reached = closure(entry_modules(spec["cmd"]), NOT_FOLLOWED.get(stage, frozenset()))
    code = [dep for dep in spec["deps"] if dep.endswith(".py") or (REPO / dep / "__init__.py").is_file()]
    unused = [dep for dep in code if not any(_covers(dep, path) for path in reached)]
    assert not unused, f"dvc.yaml stage {stage}: deps no module of the stage imports: {', '.join(unused)}"


def test_the_walk_follows_function_level_relative_and_package_imports():
    reached = closure(["pipeline.train"])
    assert REPO / "pipeline" / "stats.py" in reached  # a top-level import
    assert REPO / "pipeline" / "build_checks.py" in reached  # imported inside pipeline.config.validate
    assert REPO / "pipeline" / "__init__.py" in reached and REPO / "sasa" / "__init__.py" in reached
    assert REPO / "sasa" / "layers" / "halo.py" in reached  # sasa.layers imports each of its modules by name
    assert closure(["pipeline.prepare"], NOT_FOLLOWED["prepare"]).keys().isdisjoint((REPO / "sasa").rglob("*.py"))
