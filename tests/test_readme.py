"""The README's two set-up commands exist, and .ci/run runs the README's test command verbatim."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bash_blocks(text: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S)]


def test_ci_runs_the_readme_test_command():
    setup = ROOT.joinpath("README.md").read_text().split("## Set up on a fresh machine", 1)[1].split("\n## ", 1)[0]
    blocks = bash_blocks(setup)
    assert len(blocks) == 2, "the README's set-up section has exactly two commands"
    main_job, test_command = blocks
    assert "cli.py compare" in main_job and "pytest" in test_command
    assert test_command in ROOT.joinpath(".ci", "run").read_text().splitlines()
