"""The house reads one way: every import in the four packages follows the layer order, leaves
import nothing of the project, stage modules do not import each other, and no module imports
itself back through others (function-local imports included).

Order, top to bottom (docs/architecture.md):

    pipeline   the driver: config, stage graph, run directory, CLI, plan
    stages     one module (or package) per stage, and the shared stage helpers
    actors     the Ray roles as plain classes: rollout worker, learner, scorer
    cluster    Ray plumbing: session, launch, networking, DeepSpeed setup, Ray Train, weight sync, metrics

A module may import its own package and the packages below it. Leaves (pure math and data
types, and stdlib-only helpers) import none of the four packages, and any layer may import them.
"""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ORDER = ["cluster", "actors", "stages", "pipeline"]  # bottom to top
LEAVES = {
    "stages.objectives",  # all the math and the algorithm registry (torch only)
    "actors.experience",  # the batch and minibatch types, padding (torch only)
    "stages.text",  # the conversation template and text keys (stdlib only)
    "stages.files",  # JSON lines, atomic writes, hashes (stdlib only)
    "stages.stage_names",  # the NAME@k convention (stdlib only)
}


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
        if mod in LEAVES:
            continue
        level = ORDER.index(mod.split(".")[0])
        bad += [f"{mod} -> {d}" for d in deps if d not in LEAVES and ORDER.index(d.split(".")[0]) > level]
    assert bad == []


def test_leaves_import_nothing_of_the_project():
    g = graph()
    assert LEAVES <= set(g)
    assert {leaf: g[leaf] for leaf in LEAVES if g[leaf]} == {}


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
