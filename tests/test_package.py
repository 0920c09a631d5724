"""The package as installed: a light top-level import, declared dependencies, shipped configs."""

import ast
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

HEAVY = ("transformers", "trl", "wandb", "hydra", "omegaconf", "peft")


LIGHT = ["import sae_shards; from sae_shards import LowRankSAE, SAEConfig",
         "import sae_shards.core.sae, sae_shards.core.trainer, sae_shards.core.checkpoint",
         "import sae_shards.run.config",
         "import sae_shards.analysis.shards",
         "from sae_shards.cli import main; main(['--help'])"]  # each command imports its own


def test_light_modules_import_no_rl_stack(tmp_path):
    """``import sae_shards``, the core, the config dataclasses, the shard-loading API and
    ``sae-shards --help`` pull in none of the RL / logging stack (docs/architecture.md,
    "Imports go one way"). One process runs them in turn and checks after each, so the first
    that pulls a heavy module in is the one named (what it pulls stays loaded after it)."""
    code = "\n".join(["import sys", *(
        f"{statement}\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        f"assert not heavy, {statement!r} + ' imported ' + repr(heavy)" for statement in LIGHT)])
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_cli_help_and_config_dir(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sae_shards.cli", "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: sae-shards")
    from sae_shards.cli import CONFIG_DIR, config_dir

    assert CONFIG_DIR == config_dir()
    assert (CONFIG_DIR / "config.yaml").is_file()
    assert (CONFIG_DIR / "sae" / "default.yaml").is_file()


# ---------------------------------------------------------------------------- declared dependencies


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> set[str]:
    project = PYPROJECT["project"]
    reqs = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    return {_norm(re.split(r"[<>=!~;\[ (@]", r.strip(), maxsplit=1)[0]) for r in reqs}


def _imported_top_level_modules() -> dict[str, str]:
    """``{top-level module: first file importing it}`` over sae_shards/ and scripts/ (absolute
    imports only; the project's own top-level names excluded)."""
    own = {p.name for p in ROOT.iterdir() if p.is_dir()} | {p.stem for p in ROOT.glob("*.py")}
    found: dict[str, str] = {}
    files = sorted(ROOT.glob("sae_shards/**/*.py")) + sorted(ROOT.glob("scripts/**/*.py"))
    assert files, f"no sources under {ROOT}"
    for file in files:
        tree = ast.parse(file.read_text(), filename=str(file))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in own or top == "__future__":
                    continue
                found.setdefault(top, str(file.relative_to(ROOT)))
    return found


def test_every_third_party_import_is_declared():
    declared = _declared()
    dists = metadata.packages_distributions()
    missing = []
    for module, where in sorted(_imported_top_level_modules().items()):
        # an import that is not installed here maps to its own name (and most likely fails)
        candidates = {_norm(d) for d in dists.get(module, [module])}
        if not candidates & declared:
            missing.append(f"{module} (imported in {where}; distribution "
                           f"{' or '.join(sorted(candidates))})")
    assert not missing, ("imported but not declared in pyproject.toml, so a fresh install lacks "
                         "them:\n  " + "\n  ".join(missing))


# ---------------------------------------------------------------------------- what the wheel ships


def test_wheel_lists_every_subpackage_and_ships_the_configs():
    setuptools_cfg = PYPROJECT["tool"]["setuptools"]
    packages = set(setuptools_cfg["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts)
               for p in ROOT.glob("sae_shards/**/__init__.py")}
    assert on_disk - packages == set(), "add new subpackages to [tool.setuptools] packages"
    assert setuptools_cfg["package-dir"]["sae_shards.configs"] == "configs"
    assert "sae_shards.configs" in packages
    globs = setuptools_cfg["package-data"]["sae_shards.configs"]
    shipped = {p for g in globs for p in (ROOT / "configs").glob(g)}
    every_yaml = set((ROOT / "configs").rglob("*.yaml"))
    assert every_yaml and every_yaml <= shipped, f"not shipped: {sorted(every_yaml - shipped)}"
