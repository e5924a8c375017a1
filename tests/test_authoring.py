"""The plugin-author surface: one training step owned by the Runtime, the public capture
API, named errors, the ``register_commands`` hook, registries built once, the import
structure of the core modules, and the documentation matching the code."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import lvlm_safety_plugins
from lvlm_safety_plugins import (
    EXTRAS_KEY,
    ForwardCapture,
    LVLMSafetyError,
    PluginError,
    Runtime,
    StepError,
    UnknownHookError,
    get_adapter,
    hookimpl,
)
from lvlm_safety_plugins.errors import CaptureError
from lvlm_safety_plugins.plugins import create_plugin_manager
from lvlm_safety_plugins.testing import build_tiny_llava, build_tiny_llava_processor, tiny_llava_sft_batch

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"lvlm_safety_plugins": ROOT / "lvlm_safety_plugins", "lvlm_safety_plugins.integrations": ROOT / "integrations"}
#: the modules of the plugin bus itself (issue #19): no import cycle among them
CORE = ("adapters", "adapters.base", "hookspecs", "methods.base", "plugins", "recipe", "registry", "runtime", "markers", "errors")


# -- the import graph ---------------------------------------------------------------------


def _module_files() -> dict[str, Path]:
    files = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join([package, *parts])] = path
    return files


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports when it runs, at any level (function
    bodies included; ``if TYPE_CHECKING:`` blocks left out, since they never run).
    Importing ``a.b.c`` runs ``a.b`` first: that edge is there too (except the root
    package, which imports nothing eagerly but the dependency-free modules)."""
    files = _module_files()
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_lines(tree)
        is_package = path.name == "__init__.py"
        deps: set[str] = set()
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = module.split(".") if is_package else module.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in files else target for a in node.names]
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if not target or target == module:
                    continue
                deps.add(target)
                parent = target.rpartition(".")[0]
                while parent and parent != "lvlm_safety_plugins":  # the parent package runs first
                    if parent in files and parent != module:
                        deps.add(parent)
                    parent = parent.rpartition(".")[0]
        graph[module] = deps
    return graph


def _cycles(graph: dict[str, set[str]], nodes: set[str]) -> list[list[str]]:
    """Strongly connected components of more than one module within ``nodes`` (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in nodes:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def test_the_core_modules_form_no_import_cycle():
    graph = import_graph()
    core = {f"lvlm_safety_plugins.{m}" for m in CORE}
    assert core <= set(graph), sorted(core - set(graph))
    # everything the core reaches, transitively: a cycle through any of it counts
    reach, todo = set(core), list(core)
    while todo:
        for dep in graph[todo.pop()]:
            if dep not in reach:
                reach.add(dep)
                todo.append(dep)
    assert _cycles(graph, reach) == []


def test_the_cycle_check_finds_a_cycle():
    """The checker itself: a function-level import back into a module is a cycle."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph, set(graph)) == [["a", "b", "c"]]
    real = import_graph()
    # a real edge the checker must see: registry imports methods.base inside a function
    assert "lvlm_safety_plugins.methods.base" in real["lvlm_safety_plugins.registry"]


def test_markers_hookspecs_errors_and_the_root_import_without_torch():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            "import lvlm_safety_plugins.markers, lvlm_safety_plugins.hookspecs, lvlm_safety_plugins.errors\n"
            "from lvlm_safety_plugins import hookimpl, LVLMSafetyError, __version__\n"
            "import lvlm_safety_plugins.plugins\n"
            "print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


# -- named errors -------------------------------------------------------------------------

BUILTIN_ERRORS = {"ValueError", "TypeError", "KeyError", "IndexError", "RuntimeError", "ImportError",
                  "FileNotFoundError", "LookupError", "OSError", "Exception"}  # AttributeError: the __getattr__ protocol


def test_the_library_raises_only_its_named_errors():
    bare = []
    for module, path in _module_files().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Raise) and node.exc is not None:
                exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                if isinstance(exc, ast.Name) and exc.id in BUILTIN_ERRORS:
                    bare.append(f"{path.relative_to(ROOT)}:{node.lineno}: raise {exc.id}")
    assert bare == []


def test_every_named_error_derives_from_the_base_and_is_public():
    from lvlm_safety_plugins import errors

    named = [getattr(errors, n) for n in errors.__all__]
    assert len(named) >= 12
    for cls in named:
        assert issubclass(cls, LVLMSafetyError) and cls.__name__ in lvlm_safety_plugins.__all__


def test_the_cli_prints_a_named_error_as_one_line_with_exit_code_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("plugins: [cmrm]\ncmrm:\n  alpha: [1, 2]\n  layers: '1-3'\n  vectors: x\n")
    done = subprocess.run([sys.executable, "-m", "lvlm_safety_plugins.cli", "recipes", "validate", str(bad)],
                          capture_output=True, text=True)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lvlm-safety: error:") and str(bad) in lines[0] and "alpha" in lines[0]


# -- the plugin manager: hooks, registries, commands -------------------------------------------


def test_a_misspelt_hook_names_the_closest_and_every_valid_hook():
    plugin = types.ModuleType("typo_plugin")

    @hookimpl
    def befor_forward(model, batch, ctx):  # noqa: ANN001 - the typo under test
        return None

    plugin.befor_forward = befor_forward
    pm = create_plugin_manager(autoload=False)
    pm.register(plugin, "typo_plugin")
    with pytest.raises(UnknownHookError) as err:
        pm.check_pending()
    message = str(err.value)
    assert "typo_plugin" in message and "'befor_forward'" in message and "did you mean 'before_forward'" in message
    for hook in ("loss_terms", "register_methods", "register_commands", "install_steering"):
        assert hook in message
    assert "<module" not in message and isinstance(err.value, PluginError)


def test_registries_are_built_once_per_plugin_manager():
    from lvlm_safety_plugins import registry

    calls = []
    plugin = types.ModuleType("counting_plugin")

    @hookimpl
    def register_judges(register):  # noqa: ANN001
        calls.append(1)
        register("always", lambda **_: None)

    plugin.register_judges = register_judges
    pm = create_plugin_manager(autoload=False)
    pm.register(plugin, "counting_plugin")
    for _ in range(5):
        assert "always" in registry.judges(pm)
        registry.methods(pm)
    assert len(calls) == 1
    # a new plugin makes it rebuild (once)
    pm.register(types.ModuleType("another"), "another")
    registry.judges(pm)
    registry.judges(pm)
    assert len(calls) == 2


def test_a_plugin_adds_a_cli_subcommand_through_register_commands(capsys):
    from lvlm_safety_plugins import cli, registry
    from lvlm_safety_plugins.commands_builtin import BUILTIN_COMMANDS

    plugin = types.ModuleType("hello_plugin")

    def add_command(subparsers):  # noqa: ANN001
        parser = subparsers.add_parser("hello", help="say hello")
        parser.add_argument("--name", default="world")
        parser.set_defaults(func=lambda args: print(f"hello {args.name}") or (3 if args.name == "three" else 0))

    @hookimpl
    def register_commands(register):  # noqa: ANN001
        register("hello", add_command)

    plugin.register_commands = register_commands
    pm = create_plugin_manager(autoload=False)
    pm.register(plugin, "hello_plugin")
    names = set(registry.commands(pm))
    assert names == set(BUILTIN_COMMANDS) | {"hello"}
    parser = cli.build_parser(pm)
    args = parser.parse_args(["hello", "--name", "there"])
    assert args.func(args) == 0 and capsys.readouterr().out == "hello there\n"
    # a clash with a built-in command is an error naming both registrations
    clash = types.ModuleType("clash_plugin")

    @hookimpl
    def register_commands(register):  # noqa: ANN001, F811
        register("demo", add_command)

    clash.register_commands = register_commands
    pm.register(clash, "clash_plugin")
    with pytest.raises(LVLMSafetyError, match="command 'demo' is registered twice"):
        cli.build_parser(pm)


# -- the training step ----------------------------------------------------------------------


class Recorder:
    """A plugin that records the lifecycle calls of one step."""

    def __init__(self, fail_in: str | None = None) -> None:
        self.calls: list[str] = []
        self.fail_in = fail_in
        self.seen: dict = {}

    def _maybe_fail(self, hook: str) -> None:
        self.calls.append(hook)
        if self.fail_in == hook:
            raise RuntimeError(f"boom in {hook}")

    @hookimpl
    def before_forward(self, model, batch, ctx):  # noqa: ANN001
        self.seen["extras"] = dict(ctx.extras)
        self.seen["batch_keys"] = sorted(batch)
        self.seen["capture"] = ctx.capture([1], projector=True)
        self._maybe_fail("before_forward")

    @hookimpl
    def loss_terms(self, model, batch, outputs, ctx):  # noqa: ANN001
        self._maybe_fail("loss_terms")
        self.seen["host_loss"] = ctx.host_loss
        proj = self.seen["capture"].projector_output
        ctx.metrics["rec/norm"] = float(proj.detach().norm())
        return {"rec/l2": 0.25 * proj.pow(2).mean()}

    @hookimpl
    def step_end(self, model, ctx):  # noqa: ANN001
        self.calls.append("step_end")
        return {"rec/step": float(ctx.step)}


def _runtime_with(plugin, model, processor):
    pm = create_plugin_manager(autoload=False)
    pm.register(plugin, "recorder")
    return Runtime({"plugins": []}, model=model, processor=processor, pm=pm)


def test_training_step_runs_the_lifecycle_once_and_sums_the_scaled_terms():
    model = build_tiny_llava(seed=2).train()
    processor = build_tiny_llava_processor()
    batch = tiny_llava_sft_batch(processor)
    rec = Recorder()
    rt = _runtime_with(rec, model, processor)
    marker = torch.ones(2)
    result = rt.training_step(model, {**batch, EXTRAS_KEY: {"marker": marker}}, step=7, max_steps=10, term_scale=0.5)
    assert rec.calls == ["before_forward", "loss_terms", "step_end"]
    assert rec.seen["extras"]["marker"] is marker and EXTRAS_KEY not in rec.seen["batch_keys"]
    with torch.no_grad():
        host = model(**batch).loss
    torch.testing.assert_close(result.host_loss.detach(), host)
    assert rec.seen["host_loss"] is result.host_loss
    torch.testing.assert_close(result.loss, result.host_loss + 0.5 * result.terms["rec/l2"])
    assert set(result.metrics) == {"rec/l2", "rec/norm", "rec/step"} and result.metrics["rec/step"] == 7.0
    assert result.context.progress == pytest.approx(0.7) and rt.current_step is None
    # the capture's hooks are gone after the step
    adapter = get_adapter(model)
    assert not adapter.projector._forward_hooks and not adapter.decoder_layers[1]._forward_hooks


@pytest.mark.parametrize("fail_in", ["before_forward", "loss_terms"])
def test_step_end_runs_and_captures_are_removed_when_the_step_raises(fail_in):
    model = build_tiny_llava(seed=2).train()
    processor = build_tiny_llava_processor()
    rec = Recorder(fail_in)
    rt = _runtime_with(rec, model, processor)
    with pytest.raises(PluginError, match=f"boom in {fail_in}"):
        rt.training_step(model, tiny_llava_sft_batch(processor), step=0)
    assert rec.calls[-1] == "step_end"
    adapter = get_adapter(model)
    assert not adapter.projector._forward_hooks and not adapter.decoder_layers[1]._forward_hooks


def test_a_batch_without_labels_is_a_named_error():
    from transformers import LlamaForCausalLM

    from lvlm_safety_plugins.testing import tiny_llava_config

    # a causal LM returns no loss without labels (transformers 4.37's Llava returns NaN instead)
    model = LlamaForCausalLM(tiny_llava_config().text_config).train()
    ids = torch.tensor([[5, 6, 7]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with pytest.raises(StepError, match="labels"):
        Runtime({"plugins": []}, model=model).training_step(model, batch, step=0)


def test_the_runtime_is_built_the_same_way_from_a_name_a_path_a_dict_and_a_recipe(tmp_path):
    from lvlm_safety_plugins import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("defaults: [comparative]\nplugins: [comparative]\n")
    built = [Runtime("comparative", overrides=["comparative.weight=0.25"]),
             Runtime(str(path), overrides=["comparative.weight=0.25"]),
             Runtime({"defaults": ["comparative"], "plugins": ["comparative"]}, overrides=["comparative.weight=0.25"]),
             Runtime(load_recipe("comparative"), overrides=["comparative.weight=0.25"])]
    assert {rt.methods["comparative"].config.weight for rt in built} == {0.25}
    assert Runtime.coerce(built[0]) is built[0]


# -- the public capture API -------------------------------------------------------------------


def test_forward_capture_returns_what_the_forward_computed():
    model = build_tiny_llava(seed=4).train()
    processor = build_tiny_llava_processor()
    batch = tiny_llava_sft_batch(processor)
    adapter = get_adapter(model)
    got = {}

    class Reader:
        @hookimpl
        def before_forward(self, model, batch, ctx):  # noqa: ANN001
            got["cap"] = ctx.capture([0, 2], token_masks={"last": _last_token_mask(batch)}, projector=True, embeddings=True)

        @hookimpl
        def loss_terms(self, model, batch, outputs, ctx):  # noqa: ANN001
            cap = got["cap"]
            got.update(proj=cap.projector_output, emb=cap.input_embeddings, s2=cap.states(2),
                       img0=cap.pooled("image", 0), last2=cap.stacked("last")[1], row0=cap.image_embeddings(0))
            assert cap.stacked("image").requires_grad  # states keep their gradient
            return None

    rt = _runtime_with(Reader(), model, processor)
    rt.training_step(model, batch, step=0)
    # by hand: the same forward with output_hidden_states and a raw hook on the projector
    seen = {}
    handle = adapter.projector.register_forward_hook(lambda m, a, o: seen.setdefault("proj", o))
    with torch.no_grad():
        hs = model(**batch, output_hidden_states=True).hidden_states
    handle.remove()
    image = adapter.layout(batch).image_mask
    torch.testing.assert_close(got["proj"].detach(), seen["proj"])
    torch.testing.assert_close(got["emb"].detach(), hs[0])
    torch.testing.assert_close(got["s2"].detach(), hs[3])  # layer l = hidden_states[l + 1]
    want_img0 = torch.stack([hs[1][b][image[b]].mean(0) for b in range(hs[1].shape[0])])
    torch.testing.assert_close(got["img0"].detach(), want_img0)
    # the last prompt token (right padding): the last real position of the decoder's sequence, which
    # transformers 4.37 lengthens by splicing the image features in
    real = adapter.layout(batch).attention_mask
    last = [int(real[b].nonzero().max()) for b in range(real.shape[0])]
    torch.testing.assert_close(got["last2"].detach(), torch.stack([hs[3][b][last[b]] for b in range(len(last))]))
    torch.testing.assert_close(got["row0"].detach(), hs[0][0][image[0]])
    assert got["row0"].shape[0] == int(image[0].sum()) > 0


def _last_token_mask(batch):
    attn = batch["attention_mask"].bool()
    mask = torch.zeros_like(attn)
    last = attn.long().cumsum(1).argmax(1)
    mask[torch.arange(len(attn)), last] = True
    return mask


def test_reading_what_was_not_captured_is_a_named_error():
    model = build_tiny_llava(seed=4)
    processor = build_tiny_llava_processor()
    batch = tiny_llava_sft_batch(processor)
    adapter = get_adapter(model)
    cap = ForwardCapture(adapter, adapter.layout(batch), [1]).start()
    with pytest.raises(CaptureError, match="projector=True"):
        cap.projector_output
    with pytest.raises(CaptureError, match="no forward"):
        cap.states(1)
    with pytest.raises(CaptureError, match="layer 3 was not captured"):
        cap.states(3)
    with pytest.raises(CaptureError, match="token_masks"):
        ForwardCapture(adapter, adapter.layout(batch), [1], masks={"bad": torch.ones(2, 3, dtype=torch.bool)})


# -- the documentation matches the code ---------------------------------------------------------

SIGNATURE = re.compile(r"`((?:lvlm_safety_plugins\.)?[A-Za-z_][\w.]*)\(([^`]*)\)`")


def _resolve(dotted: str):
    parts = dotted.split(".")
    if parts[0] != "lvlm_safety_plugins":
        parts = ["lvlm_safety_plugins", *parts]
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr, None)
            if obj is None:
                return None
        return obj
    return None


def _documented_signatures(text: str):
    for match in SIGNATURE.finditer(text):
        name, args = match.groups()
        if not name.startswith("lvlm_safety_plugins.") and name.split(".")[0] not in {
                "steering", "Runtime", "StepContext", "ForwardCapture", "HiddenCapture", "testing", "registry"}:
            continue
        yield name, args


def test_every_public_function_named_in_the_authoring_guide_exists_with_that_signature():
    guide = (ROOT / "docs" / "plugin-authoring.md").read_text(encoding="utf-8")
    checked = 0
    for name, args in _documented_signatures(guide):
        obj = _resolve(name)
        assert obj is not None, f"docs/plugin-authoring.md names `{name}(...)`, which does not exist"
        params = inspect.signature(obj).parameters
        names = [p for p in params if p not in ("self", "cls")]
        for arg in [a.strip() for a in args.split(",") if a.strip()]:
            if arg in ("*", "...", "**options") or arg.startswith("**"):
                continue
            key = arg.split("=")[0].strip().lstrip("*")
            assert key in names, f"`{name}({args})` in docs/plugin-authoring.md: {key!r} is not a parameter ({names})"
        checked += 1
    assert checked >= 12


def test_a_failed_steering_install_leaves_no_hook_of_the_plugins_before_it():
    """Plugins install one at a time: when a later one raises, the handles the earlier
    ones installed are removed (pluggy's hook call would have dropped them)."""
    from lvlm_safety_plugins import steering

    model = build_tiny_llava(seed=1)
    adapter = get_adapter(model)

    def hooks():
        return [(len(m._forward_hooks), len(m._forward_pre_hooks), "forward" in m.__dict__) for m in model.modules()]

    before = hooks()

    class Adds:
        @hookimpl
        def install_steering(self, model, runtime):  # noqa: ANN001
            return steering.add_vectors(model, {1: torch.ones(adapter.hidden_size)}, adapter=runtime.adapter, name="adds")

    class Fails:
        @hookimpl(trylast=True)
        def install_steering(self, model):  # noqa: ANN001 - fewer arguments than the spec, as pluggy allows
            raise RuntimeError("cannot steer")

    pm = create_plugin_manager(autoload=False)
    pm.register(Adds(), "adds")
    pm.register(Fails(), "fails")
    rt = Runtime({"plugins": []}, model=model, pm=pm)
    with pytest.raises(PluginError, match="cannot steer"):
        rt.install_steering()
    assert hooks() == before
    with pytest.raises(PluginError, match="cannot steer"):
        with rt.steering():
            pass
    assert hooks() == before
    # without the failing plugin: installed, then removed
    pm.unregister(name="fails")
    rt = Runtime({"plugins": []}, model=model, pm=pm)
    with rt.steering():
        assert hooks() != before
    assert hooks() == before
