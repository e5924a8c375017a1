"""The example external plugin (examples/shiftdc_plugin) round trip: installed with pip
into a fresh virtualenv, discovered through its entry point, run through its recipe by
its own tests (which use this package's pytest fixtures through ``pytest11``)."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sysconfig
import venv
from pathlib import Path

import pytest

from lvlm_safety_plugins.registry import methods

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "shiftdc_plugin"


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LVLM_SAFETY_")}
    env["PYTHONNOUSERSITE"] = "1"
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def plugin_venv(tmp_path_factory) -> Path:
    """A new virtualenv that sees this environment's packages (torch, transformers,
    lvlm-safety-plugins) through a .pth file, with the example installed by pip."""
    root = tmp_path_factory.mktemp("venv")
    env_dir = root / "env"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site_dir = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    parents = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site_dir / "_parent_env.pth").write_text("".join(f"import site; site.addsitedir({p!r})\n" for p in sorted(parents)))
    source = root / "src"  # a copy, so the build leaves nothing in the repository
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q", str(source)], cwd=root)
    assert list(site_dir.glob("lvlm_shiftdc-*.dist-info")), "pip did not install the example into the new virtualenv"
    return python


def test_example_is_not_installed_here():
    assert "shiftdc" not in methods()


def test_installed_example_is_discovered_through_its_entry_point(plugin_venv, tmp_path):
    listing = json.loads(_run([str(plugin_venv), "-m", "lvlm_safety_plugins.cli", "plugins", "list", "--json"], cwd=tmp_path).stdout)
    plugin = {p["name"]: p for p in listing["plugins"]}["shiftdc"]
    assert plugin["package"] == "lvlm-shiftdc" and not plugin["builtin"]
    assert set(plugin["hooks"]) >= {"register_methods", "register_recipe_dirs"}
    assert listing["methods"]["shiftdc"]["kind"] == "steering"
    recipes = json.loads(_run([str(plugin_venv), "-m", "lvlm_safety_plugins.cli", "recipes", "list", "--json"], cwd=tmp_path).stdout)
    assert "shiftdc_llava" in {r["name"] for r in recipes}
    # the allow-list keeps it out
    env_off = _run([str(plugin_venv), "-c", "import os; os.environ['LVLM_SAFETY_PLUGINS']='none'; "
                    "from lvlm_safety_plugins.registry import methods; print(sorted(methods()))"], cwd=tmp_path)
    assert "shiftdc" not in env_off.stdout


def test_example_runs_through_its_recipe_with_its_own_tests(plugin_venv, tmp_path):
    proc = _run([str(plugin_venv), "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(EXAMPLE),
                 str(EXAMPLE / "tests")], cwd=tmp_path)
    assert "6 passed" in proc.stdout, proc.stdout[-2000:]


def _imports(path: Path):
    """Every ``(module, name)`` a file imports from lvlm_safety_plugins (``name`` is
    ``None`` for ``import module``), function-level and TYPE_CHECKING imports included."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "lvlm_safety_plugins":
                    yield node.lineno, alias.name, None
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "lvlm_safety_plugins":
            for alias in node.names:
                yield node.lineno, node.module, alias.name


def test_the_example_imports_only_public_names():
    import importlib

    import lvlm_safety_plugins

    public = set(lvlm_safety_plugins.PUBLIC_MODULES)
    files = sorted(EXAMPLE.rglob("*.py"))
    assert len(files) >= 6
    seen = 0
    for path in files:
        for line, module, name in _imports(path):
            where = f"{path.relative_to(EXAMPLE)}:{line}"
            assert module in public, f"{where}: imports the private module {module} (public: {sorted(public)})"
            if name is not None:
                exported = getattr(importlib.import_module(module), "__all__", ())
                assert name in exported, f"{where}: {module}.{name} is not in that module's __all__"
            seen += 1
    assert seen >= 10
