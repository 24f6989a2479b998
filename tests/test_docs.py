"""The README documents every config key, generated from the same Field descriptions the code uses."""

from pathlib import Path

from jobs.run import reference_table
from pipeline.config import config_reference

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_readme_config_reference_is_current():
    assert reference_table() in README, "regenerate with: python -m jobs.run --config-reference"
    assert len(config_reference()) > 40
