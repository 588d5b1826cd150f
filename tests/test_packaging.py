"""The install: pyproject.toml's core and extras and requirements.txt (what scripts/setup.sh
installs) name the same packages."""
import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def names(specs) -> set[str]:
    return {re.split(r"[<>=!~\[ ;#]", s.strip(), 1)[0].lower() for s in specs if s.strip()}


def test_requirements_are_the_core_and_the_extras_setup_installs():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    lines = [l for l in (REPO / "requirements.txt").read_text().splitlines()
             if l.strip() and not l.lstrip().startswith("#")]
    wanted = names(project["dependencies"]) | set().union(
        *(names(v) for k, v in extras.items() if k != "wandb"))
    assert names(lines) == wanted
    # reading needs no torch: the core has none of the research stack
    assert not names(project["dependencies"]) & {"torch", "torchvision", "timm", "x-transformers"}
    assert "released/*" in str((REPO / "pyproject.toml").read_text())
