"""The plugin bus: entry points of a really installed distribution, the environment
controls, errors raised inside plugins, misspelt hooks, and hook documentation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lvlm_safety_plugins import PluginError, Runtime, get_plugin_manager, hookimpl, load_recipe, register_plugin
from lvlm_safety_plugins import hookspecs
from lvlm_safety_plugins.plugins import BUILTIN_PLUGINS, create_plugin_manager
from lvlm_safety_plugins.registry import methods

ROOT = Path(__file__).resolve().parents[1]

PLUGIN_SOURCE = '''
from dataclasses import dataclass
from lvlm_safety_plugins import Method, hookimpl


@dataclass
class EchoConfig:
    prefix: str = "SAFE: "


class EchoPrompt(Method):
    """A prompt-defence method that prefixes every example's prompt."""

    name = "echo_prompt"
    kind = "prompt"
    config_class = EchoConfig

    @hookimpl
    def prepare_example(self, example):
        return {"prompt": self.config.prefix + example["prompt"]}


@hookimpl
def register_methods(register):
    register(EchoPrompt)
'''


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory) -> Path:
    """A tiny distribution with an ``lvlm_safety_plugins`` entry point, installed with
    pip into a target folder (a real install: dist-info, entry_points.txt)."""
    src = tmp_path_factory.mktemp("src")
    (src / "lvlm_echo_plugin.py").write_text(PLUGIN_SOURCE)
    (src / "pyproject.toml").write_text(textwrap.dedent('''
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "lvlm-echo-plugin"
        version = "1.2.3"
        [project.entry-points.lvlm_safety_plugins]
        echo = "lvlm_echo_plugin"
        [tool.setuptools]
        py-modules = ["lvlm_echo_plugin"]
    '''))
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", "--target", str(target), str(src)],
        check=True,
        capture_output=True,
    )
    assert list(target.glob("lvlm_echo_plugin-1.2.3.dist-info/entry_points.txt"))
    return target


PROBE = '''
import json
from lvlm_safety_plugins import get_plugin_manager
from lvlm_safety_plugins.registry import methods
pm = get_plugin_manager()
print(json.dumps({"plugins": [[i.name, i.package, i.version, list(i.hooks)] for i in pm.plugin_infos()],
                  "methods": sorted(methods(pm))}))
'''


def probe(site: Path, **env: str) -> dict:
    full = {k: v for k, v in os.environ.items() if not k.startswith("LVLM_SAFETY")}
    full["PYTHONPATH"] = os.pathsep.join([str(site), full.get("PYTHONPATH", "")])
    full.update(env)
    out = subprocess.run([sys.executable, "-c", PROBE], env=full, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_entry_point_plugin_is_discovered(installed_plugin):
    got = probe(installed_plugin)
    assert ["echo", "lvlm-echo-plugin", "1.2.3", ["register_methods"]] in got["plugins"]
    assert "echo_prompt" in got["methods"] and "cmrm" in got["methods"]


def test_allow_list_filters_entry_points(installed_plugin):
    kept = probe(installed_plugin, LVLM_SAFETY_PLUGINS="echo")
    assert "echo_prompt" in kept["methods"]
    dropped = probe(installed_plugin, LVLM_SAFETY_PLUGINS="something_else")
    assert "echo_prompt" not in dropped["methods"]
    # built-ins are always there
    assert "cmrm" in dropped["methods"]
    assert {p[0] for p in dropped["plugins"]} == set(BUILTIN_PLUGINS)


def test_autoload_can_be_disabled(installed_plugin):
    got = probe(installed_plugin, LVLM_SAFETY_DISABLE_PLUGIN_AUTOLOAD="1")
    assert "echo_prompt" not in got["methods"]
    assert {p[0] for p in got["plugins"]} == set(BUILTIN_PLUGINS)


def test_entry_point_method_runs_through_a_recipe(installed_plugin, monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(installed_plugin))
    import importlib

    importlib.invalidate_caches()
    pm = create_plugin_manager()
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text("plugins: [echo_prompt]\necho_prompt: {prefix: '[x] '}\n")
    runtime = Runtime(load_recipe(recipe_path, pm=pm), pm=pm)
    assert runtime.prepare_example({"prompt": "hello", "id": 1}) == {"prompt": "[x] hello", "id": 1}


def test_exception_in_plugin_names_plugin_and_hook():
    class Broken:
        @hookimpl
        def register_judges(self, register):
            raise RuntimeError("judge table exploded")

    register_plugin(Broken(), "broken-judges")
    from lvlm_safety_plugins.registry import judges

    with pytest.raises(PluginError) as info:
        judges()
    assert info.value.plugin == "broken-judges"
    assert info.value.hook == "register_judges"
    assert "plugin 'broken-judges' raised RuntimeError in hook 'register_judges': judge table exploded" in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_exception_in_method_lifecycle_hook(tmp_path):
    from dataclasses import dataclass

    from lvlm_safety_plugins import Method

    @dataclass
    class Cfg:
        pass

    class Exploding(Method):
        name = "exploding"
        kind = "loss"
        config_class = Cfg

        @hookimpl
        def collate(self, examples, batch):
            raise ValueError("bad batch")

    class Plugin:
        @hookimpl
        def register_methods(self, register):
            register(Exploding)

    register_plugin(Plugin(), "exploding-plugin")
    rt = Runtime(load_recipe({"plugins": ["exploding"]}))
    with pytest.raises(PluginError, match="plugin 'method:exploding' raised ValueError in hook 'collate': bad batch"):
        rt.collate([{}], {})


def test_misspelt_hook_fails_loudly():
    class Typo:
        @hookimpl
        def register_method(self, register):  # missing "s"
            pass

    with pytest.raises(Exception, match="register_method"):
        register_plugin(Typo(), "typo-plugin")


def test_duplicate_method_names_are_refused():
    from lvlm_safety_plugins import LVLMSafetyError, Method
    from lvlm_safety_plugins.methods.cmrm import CMRMConfig

    class FakeCMRM(Method):
        name = "cmrm"
        kind = "steering"
        config_class = CMRMConfig

    class Plugin:
        @hookimpl
        def register_methods(self, register):
            register(FakeCMRM)

    register_plugin(Plugin(), "dup")
    with pytest.raises(LVLMSafetyError, match="method 'cmrm' is registered twice"):
        methods()


def test_third_party_adapter_wins_over_builtin(tiny_llava):
    from lvlm_safety_plugins import get_adapter
    from lvlm_safety_plugins.adapters.hf import HFLlavaAdapter

    class MyLlava(HFLlavaAdapter):
        family = "my llava"

    class Plugin:
        @hookimpl
        def register_adapters(self, register):
            register(MyLlava)

    register_plugin(Plugin(), "my-adapter")
    assert type(get_adapter(tiny_llava)) is MyLlava


def test_runtime_calls_methods_in_recipe_order():
    from dataclasses import dataclass

    from lvlm_safety_plugins import Method

    @dataclass
    class Cfg:
        tag: str = ""

    def make(name):
        class Tagger(Method):
            kind = "prompt"
            config_class = Cfg

            @hookimpl
            def prepare_example(self, example):
                return {"trail": example.get("trail", "") + self.name, self.name: True}

        Tagger.name = name
        return Tagger

    first, second = make("first_m"), make("second_m")

    class Plugin:
        @hookimpl
        def register_methods(self, register):
            register(first)
            register(second)

    register_plugin(Plugin(), "order")
    calls = Runtime(load_recipe({"plugins": ["second_m", "first_m"]})).hook.prepare_example(example={}, runtime=None)
    assert [sorted(c)[0] for c in calls] == ["second_m", "first_m"]


def test_plugins_list_cli_shows_name_package_version_hooks(installed_plugin):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LVLM_SAFETY")}
    env["PYTHONPATH"] = str(installed_plugin)
    out = subprocess.run([sys.executable, "-m", "lvlm_safety_plugins.cli", "plugins", "list"], env=env, capture_output=True, text=True, check=True).stdout
    line = next(l for l in out.splitlines() if l.startswith("echo "))
    assert "lvlm-echo-plugin" in line and "1.2.3" in line and "register_methods" in line
    assert "echo_prompt" in out and "cmrm" in out


def test_every_hook_has_a_docstring_and_is_in_the_authoring_guide():
    guide = (ROOT / "docs" / "plugin-authoring.md").read_text()
    hooks = [name for name in dir(hookspecs) if getattr(getattr(hookspecs, name), "lvlm_safety_spec", None) is not None]
    assert len(hooks) >= 13
    for name in hooks:
        doc = getattr(hookspecs, name).__doc__ or ""
        assert "Called by" in doc and ("Return" in doc), name
        assert f"`{name}(" in guide, f"hook {name} is not documented in docs/plugin-authoring.md"


def test_global_manager_has_builtins():
    pm = get_plugin_manager()
    names = {n for n, _ in pm.list_name_plugin()}
    assert set(BUILTIN_PLUGINS) <= names
