"""The repository's layout rules, checked on the source itself.

No import cycle, between modules or between the stage folders: a stage may use what comes before it on the data
path and the shared modules at `pipeline/`, never what comes after it, so each stage can be read, tested and run
without the ones that follow. Every import counts, also those inside functions (deferred for speed, not for
cycles).
"""

import ast
from pathlib import Path

import pytest

from pipeline.records import DATASET_SCHEMA, TEST_PROBLEMS_SCHEMA, VERIFIED_SCHEMA, Col

ROOT = Path(__file__).resolve().parents[1]


def test_contract_columns_are_named_only_in_records():
    """Column names of the data contract come from `pipeline.records.Col`, never from a string literal.

    Flags a str constant equal to a contract column wherever it names a column: a subscript key, a key of a dict
    display, an argument of `.get`/`.pop` or of a pyarrow column/field look-up, an element of a `columns=` list, or
    the iterable of a loop or comprehension (`for k in ("problem_id", ...)`). A dict key that only shares its name
    with a column (a stats entry) is marked on its line with "not a column". eval/report.py is left out: it reads
    no rows, and its report keys ("reference", "samples", "engine") are the report's own.
    """
    columns = {value for name, value in vars(Col).items() if name.isupper()}
    assert columns == {*VERIFIED_SCHEMA.names, *DATASET_SCHEMA.names, *TEST_PROBLEMS_SCHEMA.names}
    lookups = {"get", "pop", "column", "field", "get_field_index", "set_column", "append_column", "drop_columns"}
    modules = ["pipeline/build/selection.py", "pipeline/build/stage.py", "pipeline/build/card.py"]
    modules += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "eval").glob("*.py") if p.name != "report.py")
    found = []
    for module in modules:
        source = (ROOT / module).read_text()
        lines = source.splitlines()
        named: list[ast.AST] = []
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Subscript):
                named.append(node.slice)
            elif isinstance(node, ast.Dict):
                named += [k for k in node.keys if k is not None]
            elif isinstance(node, ast.Call):
                if isinstance(node.func, ast.Attribute) and node.func.attr in lookups:
                    named += node.args
                named += [kw.value for kw in node.keywords if kw.arg == "columns"]
            elif isinstance(node, (ast.For, ast.comprehension)):
                named.append(node.iter)
        constants = [leaf for expr in named for leaf in ast.walk(expr) if isinstance(leaf, ast.Constant)]
        for c in constants:
            if c.value in columns and "not a column" not in lines[c.lineno - 1]:
                found.append(f"{module}:{c.lineno}: {c.value!r}")
    assert not found, "column names as literals (use pipeline.records.Col):\n" + "\n".join(sorted(set(found)))


# ---- imports: no cycle between modules or stage folders; the data path only looks back
PACKAGES = ("pipeline", "eval", "sft")
STAGE_FOLDERS = ("pipeline.generate", "pipeline.verify", "pipeline.build")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def _imports(module: str) -> set[str]:
    """The project's modules that `module` imports; `from package import name` counts as the submodule when
    `name` is one."""
    found = set()
    is_package = MODULES[module].name == "__init__.py"
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")[: len(module.split(".")) - node.level + is_package]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module
            targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in MODULES else prefix for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in MODULES and t != module)
    return found


def unit(module: str) -> str:
    """A stage folder counts as one unit; eval and sft each as one; every shared pipeline module as itself."""
    for folder in STAGE_FOLDERS:
        if module == folder or module.startswith(folder + "."):
            return folder
    top = module.split(".")[0]
    return top if top in ("eval", "sft") else module


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path that ends where it starts, or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_and_accepts_a_chain():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_stage_folders_exist_and_hold_their_stage():
    for folder in STAGE_FOLDERS:
        assert f"{folder}.stage" in MODULES, folder


@pytest.mark.parametrize("granularity", ["module", "stage folder"])
def test_no_import_cycle(granularity):
    graph: dict[str, set[str]] = {}
    for module in MODULES:
        source = module if granularity == "module" else unit(module)
        graph.setdefault(source, set())
        for target in _imports(module):
            target = target if granularity == "module" else unit(target)
            if target != source:
                graph[source].add(target)
    assert sum(map(len, graph.values())) > 20  # the scan sees the imports at all
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_the_data_path_only_looks_back():
    """generate never imports verify or build; verify never imports build; none imports eval, sft or the CLI."""
    later = {
        "pipeline.generate": {"pipeline.verify", "pipeline.build", "eval", "sft", "pipeline.cli", "pipeline.run"},
        "pipeline.verify": {"pipeline.build", "eval", "sft", "pipeline.cli", "pipeline.run"},
        "pipeline.build": {"eval", "sft", "pipeline.cli", "pipeline.run"},
    }
    for module in MODULES:
        if unit(module) in later:
            wrong = {unit(t) for t in _imports(module)} & later[unit(module)]
            assert not wrong, f"{module} imports {wrong}"


def test_the_readme_layout_table_names_every_module_and_folder():
    """Each stage folder has its row, and every module of pipeline/, sft/ and eval/ is named in its folder's row."""
    readme = (ROOT / "README.md").read_text()
    table = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[1].strip().strip("`"): line for line in table.splitlines() if line.startswith("| `")}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name == "__init__.py":
                continue
            relative = path.relative_to(ROOT)
            # The row of the deepest folder that has one: pipeline/verify/verifiers/math.py is in pipeline/verify/'s.
            folder = next(f"{p.as_posix()}/" for p in relative.parents if f"{p.as_posix()}/" in rows)
            inner = relative.relative_to(folder).as_posix()
            named = f"`{inner}`" in rows[folder] or f"`{path.name}`" in rows[folder]
            assert named, f"{relative} is not named in the README's row of {folder}"
    for folder in STAGE_FOLDERS:
        assert folder.replace(".", "/") + "/" in rows
