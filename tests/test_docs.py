"""The README: every config key (generated from the same Field descriptions the code uses), the install
it and CI share, and the command-line help."""

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from jobs.run import parse_args, reference_table
from pipeline.config import config_reference

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_readme_config_reference_is_current():
    assert reference_table() in README, "regenerate with: python -m jobs.run --config-reference"
    assert len(config_reference()) > 40


# ---- the install: README, CI and constraints.txt agree ---------------------------------------------

REPO = Path(__file__).parent.parent


def install_line() -> str:
    """The install line .ci/run runs (before its test command)."""
    [line] = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line.startswith("python3 -m venv")]
    return line


def test_both_readme_commands_start_with_the_install_ci_runs():
    install = install_line()
    commands = [line for line in README.splitlines() if line.startswith("python3 -m venv")]
    assert commands == [f"{install} && python -m jobs.demo", f"{install} && python -m pytest -q"]
    assert "python -m pytest -q" in (REPO / ".ci" / "run").read_text().splitlines()
    assert "-c constraints.txt" in install


def test_constraints_pin_every_requirement_within_its_range():
    """A stale constraints.txt (a range raised in pyproject.toml, infra/lock.sh not rerun) fails here."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = Version(version)
    requirements = [Requirement(r) for r in project["dependencies"]]
    requirements += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    for requirement in requirements:
        if requirement.name == project["name"]:
            continue  # the test extra includes the demo and bench extras
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not pinned in constraints.txt: rerun infra/lock.sh"
        assert requirement.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {requirement}"
    torch = re.search(r"torch==([\d.]+)", install_line())[1]
    assert pins["torch"] == Version(torch), "README/CI install a different torch than constraints.txt pins"


# ---- --help is plain text and shows what is required ------------------------------------------------


def test_run_help_shows_config_as_required_without_rst_markup(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    assert "(--config CONFIG | --config-reference)" in " ".join(text.split())
    assert "``" not in text and "python -m jobs.run --config configs/bbc_embed.yaml" in text
    with pytest.raises(SystemExit) as exit:
        parse_args([])
    assert exit.value.code == 2 and "--config" in capsys.readouterr().err
