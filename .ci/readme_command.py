"""Print command N (1 or 2) of the README's opening bash block, verbatim:
1 installs and runs the main job, 2 installs and runs the tests.
``.ci/run`` runs both as a new user would; ``tests/test_docs.py`` checks
that the block holds exactly these two commands."""

import sys
from pathlib import Path


def commands(readme: Path) -> list[str]:
    """The non-comment lines of the first fenced bash block of ``readme``."""
    text = readme.read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


if __name__ == "__main__":
    print(commands(Path(__file__).resolve().parent.parent / "README.md")[int(sys.argv[1]) - 1])
