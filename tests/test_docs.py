"""The docs a user reads: the README's size, links that lead somewhere, the configuration reference
current with the schema, and the `safe-rlhf` command as the README shows it."""
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # a `#` in a code block is no heading
    return {slug(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_the_readme_is_at_most_200_lines_and_links_every_doc():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for doc in (REPO / "docs").glob("*.md"):
        assert f"(docs/{doc.name})" in readme, doc.name


def test_every_relative_link_leads_to_a_file_and_heading_that_exist():
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # https: and the like
            file, _, anchor = target.partition("#")
            dest = (doc.parent / file).resolve() if file else doc
            if not dest.exists():
                broken.append(f"{doc.name}: {target} (no file)")
            elif anchor and anchor not in anchors(dest):
                broken.append(f"{doc.name}: {target} (no such heading)")
    assert not broken, broken


def test_the_configuration_reference_is_what_the_schema_writes():
    import typing

    from pipeline.config import RunConfig, _submodel, iter_fields
    from pipeline.config_doc import config_markdown

    committed = (REPO / "docs" / "configuration.md").read_text()
    assert committed == config_markdown(), "docs/configuration.md is stale: run `safe-rlhf config-doc --out docs/configuration.md`"
    # every key has its row (sections are headings): nested ones, and the fields of list items (`a.b[].c`)
    rows = {key.replace("[]", "") for key in re.findall(r"^\| `([^`]+)`", committed, flags=re.M)}
    keys = {name for name, info in iter_fields(RunConfig)
            if _submodel(info.annotation) is None or typing.get_origin(info.annotation) is list}
    assert rows == keys, (keys - rows, rows - keys)


def test_the_console_script_lists_every_command_and_states_the_version():
    exe = Path(sys.executable).parent / "safe-rlhf"  # installed by pyproject's [project.scripts]
    assert exe.exists(), "reinstall the project (bash scripts/setup.sh) to get the safe-rlhf command"
    helped = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and helped.stdout.startswith("usage: safe-rlhf"), helped.stderr
    from pipeline.cli import main  # noqa: F401  (the commands, from argparse's own choices)
    commands = re.search(r"\{([\w,-]+)\}", helped.stdout).group(1).split(",")
    assert {"run", "resume", "status", "serve", "sweep", "submit", "config-doc"} <= set(commands), commands
    for command in commands:  # each documented in docs/running.md's table
        assert f"| `{command}" in (REPO / "docs" / "running.md").read_text(), command
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    shown = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=120).stdout
    assert shown.startswith(f"safe-rlhf {version}"), shown
