"""The house reads one way: every import in the five packages follows the layer order, stage
modules do not import each other, `stages/` holds stages (their shared helpers are in
`stages/common/`), and no module imports itself back through others (function-local imports
included). There are no exemptions: what every layer shares lives in `core`, at the bottom.

Order, top to bottom (docs/architecture.md):

    pipeline   the driver: config loading, stage graph, run directory, CLI, plan
    stages     one module (or package) per stage; stages/common: the helpers they share
    actors     the Ray roles as plain classes: rollout worker, learner, scorer
    cluster    Ray plumbing: session, launch, networking, DeepSpeed setup, Ray Train, weight sync, metrics
    core       leaves: the math (core.objectives), the conversation template, files, stage names,
               the settings schema; it imports nothing of the project but itself

A module may import its own package and the packages below it.
"""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ORDER = ["core", "cluster", "actors", "stages", "pipeline"]  # bottom to top
CORE_THIRD_PARTY = {"torch", "pydantic", "transformers"}  # core's only imports outside the standard library


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in ORDER for p in (REPO / pkg).rglob("*.py")}


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Every project module `path` imports, at any depth of the file (functions too). `from pkg
    import name` counts as importing pkg.name when that is a module, else pkg."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names]
        else:
            continue
        out |= {n for n in names if n.split(".")[0] in ORDER}
    return out


def third_party_imports(path: Path) -> set[str]:
    """Every absolute import of `path` outside the project, by module name."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return {n for n in out if n.split(".")[0] not in ORDER and n != "__future__"}


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {m: imports_of(p, set(modules)) for m, p in modules.items()}


def stage_module_of(module: str, stage_modules: set[str]) -> str | None:
    return next((s for s in stage_modules if module == s or module.startswith(s + ".")), None)


def stage_modules() -> set[str]:
    """The modules (or packages) the stage graph runs, for the full graph of every option."""
    from pipeline.config import parse_config
    from pipeline.graph import build_graph

    cfg = parse_config({"evaluate": {"baselines": True}, "annotate": {"backend": "judge"}})
    mods = {s.module.partition(":")[0] for s in build_graph(cfg)}
    return {".".join(m.split(".")[:2]) for m in mods}  # a stage package counts as one (stages.safe_rlhf)


def test_no_module_imports_a_package_above_it():
    bad = []
    for mod, deps in graph().items():
        level = ORDER.index(mod.split(".")[0])
        bad += [f"{mod} -> {d}" for d in deps if ORDER.index(d.split(".")[0]) > level]
    assert bad == []


def test_core_imports_only_itself_and_few_libraries():
    import sys

    g = graph()
    core = {m: p for m, p in project_modules().items() if m.split(".")[0] == "core"}
    assert {"core.objectives", "core.text", "core.files", "core.stage_names", "core.schema"} <= set(core)
    assert {m: g[m] for m in core if any(not d.startswith("core") for d in g[m])} == {}
    outside = {m: sorted(libs - CORE_THIRD_PARTY) for m, p in core.items()
               if (libs := {n.split(".")[0] for n in third_party_imports(p)} - set(sys.stdlib_module_names))
               - CORE_THIRD_PARTY}
    assert outside == {}


def test_stages_holds_only_stages():
    # Every module directly under stages/ is a stage the graph runs, or the stage interface (base:
    # the context and result; run_config: the settings every stage reads); helpers
    # are in stages/common.
    stages = stage_modules()
    top = {module_name(p) for p in (REPO / "stages").glob("*.py")} | {
        module_name(p.parent) for p in (REPO / "stages").glob("*/__init__.py")}
    assert top - stages - {"stages", "stages.base", "stages.run_config", "stages.common"} == set()


def test_stage_modules_do_not_import_each_other():
    stages = stage_modules()
    assert {"stages.world", "stages.ingest", "stages.sft", "stages.fit_preference", "stages.safe_rlhf",
            "stages.red_team", "stages.annotate", "stages.evaluate", "stages.report"} == stages
    bad = []
    for mod, deps in graph().items():
        own = stage_module_of(mod, stages)
        bad += [f"{mod} -> {d}" for d in deps
                if own and stage_module_of(d, stages) not in (None, own)]
    assert bad == []


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(m, path):
        state[m] = 1
        for d in sorted(g.get(m, ())):
            if d not in g:
                continue
            if state.get(d) == 1:
                cycles.append(" -> ".join(path[path.index(d):] + [d]) if d in path else f"{m} -> {d}")
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert cycles == []


@pytest.mark.parametrize("bad", ["cluster.fake -> stages.safe_rlhf.roles", "actors.fake -> pipeline.config"])
def test_the_check_sees_an_upward_import(bad, tmp_path):
    # The rule itself: a module in a lower package importing one above it is flagged.
    low, high = bad.split(" -> ")
    assert ORDER.index(low.split(".")[0]) < ORDER.index(high.split(".")[0])
    src = tmp_path / "fake.py"
    src.write_text(f"def f():\n    from {high.rpartition('.')[0]} import {high.rpartition('.')[2]}\n")
    assert imports_of(src, set(project_modules())) == {high}
