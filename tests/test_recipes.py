"""Recipes: composition, overrides, and every bad-input case with its error text."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from lvlm_safety_plugins import RecipeError, available_recipes, load_recipe, recipe_from_dict


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_builtin_recipes_found_by_name_and_valid():
    names = available_recipes()
    assert {"cmrm_llava15_dataset", "cmrm_llava15_sample"} <= set(names)
    for name in names:
        recipe = load_recipe(name)
        assert recipe.plugins, name
        assert recipe.description, name


def test_defaults_compose_later_wins(tmp_path):
    write(tmp_path, "base.yaml", """
        description: base
        plugins: [cmrm]
        cmrm: {alpha: 0.5, layers: "1-2", reference: noise}
    """)
    write(tmp_path, "mid.yaml", """
        defaults: [base.yaml]
        cmrm: {alpha: 0.7}
    """)
    top = write(tmp_path, "top.yaml", """
        defaults: [mid.yaml, cmrm_llava15_dataset]
        description: top
        cmrm: {measure_at: mean}
    """)
    recipe = load_recipe(top)
    # cmrm_llava15_dataset comes after mid.yaml, so its alpha (1.0) and layers (all) win
    assert recipe.cmrm.alpha == 1.0
    assert recipe.cmrm.layers == "all"
    assert recipe.cmrm.reference.name == "blank"
    assert recipe.cmrm.measure_at.name == "mean"
    assert recipe.description == "top"
    assert recipe.plugins == ["cmrm"]
    assert [Path(s).name for s in recipe.sources] == ["base.yaml", "mid.yaml", "cmrm_llava15_dataset.yaml", "top.yaml"]


def test_overrides_apply_last_and_are_typed(tmp_path):
    recipe = load_recipe("cmrm_llava15_sample", ["cmrm.alpha=0.25", "cmrm.layers=[1,2]", "cmrm.batch_size=3"])
    assert recipe.cmrm.alpha == 0.25
    assert list(recipe.cmrm.layers) == [1, 2]
    assert recipe.cmrm.batch_size == 3
    assert recipe.cmrm.variant.name == "sample"  # from the file, not the defaults
    assert recipe.sources[-1] == "override 'cmrm.batch_size=3'"
    assert load_recipe("cmrm_llava15_sample", ["plugins=[]"]).plugins == []


def test_plugins_union_and_removal(tmp_path):
    write(tmp_path, "a.yaml", "plugins: [cmrm]\n")
    b = write(tmp_path, "b.yaml", "defaults: [a.yaml]\nplugins: ['~cmrm']\n")
    assert load_recipe(b).plugins == []
    c = write(tmp_path, "c.yaml", "defaults: [a.yaml]\nplugins: [cmrm]\n")
    assert load_recipe(c).plugins == ["cmrm"]


@pytest.mark.parametrize(
    "text, key, fragment",
    [
        ("plugins: [cmrm]\ncmrm: {alpah: 1}\n", "cmrm.alpah", "unknown key 'alpah' in section 'cmrm'; valid keys: alpha, apply_to"),
        ("plugins: [cmrm]\ncmrm: {batch_size: many}\n", "cmrm.batch_size", "could not be converted to Integer"),
        ("plugins: [cmrm]\ncmrm: {variant: everything}\n", "cmrm.variant", "expected one of [dataset, sample]"),
        ("plugins: [cmrm]\ncmrm: {reference: grey}\n", "cmrm.reference", "blank, noise, none"),
        ("plugins: [cmmr]\n", "plugins[0]", "unknown plugin 'cmmr'; installed methods: cmrm"),
        ("plugin: [cmrm]\n", "plugin", "unknown top-level key 'plugin'; valid keys: defaults, description, plugins"),
        ("plugins: [cmrm]\ncmrm: {alpha: [1, x]}\n", "cmrm.alpha", "alpha must be a number or a list of numbers"),
        ("plugins: [cmrm]\ncmrm: {layers: '9-3'}\n", "cmrm.layers", "the last layer is before the first"),
        ("plugins: [cmrm]\ncmrm: {alpha: [1, 2], layers: [1, 2, 3]}\n", "cmrm.alpha", "alpha has 2 values but 3 layers"),
        ("plugins: [cmrm]\ncmrm: {positions: image, apply_to: generated}\n", "cmrm.apply_to", "steers nothing"),
        ("plugins: [cmrm]\ncmrm: 3\n", "cmrm", "must be a mapping"),
        ("defaults: [no_such_recipe]\n", "defaults[0]", "unknown recipe 'no_such_recipe'; available recipes: cmrm_llava15_dataset"),
        ("plugins: [cmrm]\ncmrm: {alpha: '${oc.env:LVLM_TEST_SURELY_UNSET_VAR}'}\n", "cmrm.alpha", "${oc.env:...} is not allowed"),
        ("plugins: [cmrm]\ncmrm: {alpha: '${eval:1+1}'}\n", "cmrm.alpha", "resolver 'eval' is not allowed"),
        ("plugins: [cmrm]\ndescription: '${cmrm.nope}'\n", "description", "bad interpolation"),
        ("plugins: [cmrm, cmrm]\n", "plugins[1]", "plugin 'cmrm' is listed twice"),
        ("plugins: [cmrm]\ncmrm: {alpha: .nan}\n", "cmrm.alpha", "alpha is nan: alpha must be a finite number"),
        ("plugins: [cmrm]\ncmrm: {alpha: [.inf, 1]}\n", "cmrm.alpha", "alpha[0] is inf"),
        ("plugins: [cmrm]\ncmrm: {layers: '1,1'}\n", "cmrm.layers", "layer(s) [1] listed twice"),
    ],
)
def test_bad_recipe_errors_name_file_key_and_choices(tmp_path, text, key, fragment):
    path = write(tmp_path, "bad.yaml", text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    msg = str(info.value)
    assert str(path) in msg
    if key is not None:
        assert f"key {key!r}" in msg
        assert info.value.key == key
    assert fragment in msg
    assert info.value.source == str(path)


def test_error_names_the_included_file_that_holds_the_bad_key(tmp_path):
    write(tmp_path, "base.yaml", "cmrm: {alpah: 2}\n")
    top = write(tmp_path, "top.yaml", "defaults: [base.yaml]\nplugins: [cmrm]\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(top)
    assert info.value.source == str(tmp_path / "base.yaml")
    assert info.value.key == "cmrm.alpah"


def test_bad_override_names_the_override():
    with pytest.raises(RecipeError, match=r"override 'cmrm\.alpha=\[1,x\]': key 'cmrm\.alpha'"):
        load_recipe("cmrm_llava15_dataset", ["cmrm.alpha=[1,x]"])
    with pytest.raises(RecipeError, match="an override must look like key=value"):
        load_recipe("cmrm_llava15_dataset", ["cmrm.alpha"])
    with pytest.raises(RecipeError, match="override 'cmrm.nope=1'.*unknown key 'nope'"):
        load_recipe("cmrm_llava15_dataset", ["cmrm.nope=1"])


def test_missing_required_value(tmp_path):
    """A method config field declared MISSING must be set somewhere."""
    from dataclasses import dataclass

    from omegaconf import MISSING

    from lvlm_safety_plugins import Method, hookimpl, register_plugin

    @dataclass
    class NeedsPathConfig:
        path: str = MISSING
        weight: float = 1.0

    class NeedsPath(Method):
        name = "needs_path"
        kind = "loss"
        config_class = NeedsPathConfig

    class Plugin:
        @hookimpl
        def register_methods(self, register):
            register(NeedsPath)

    register_plugin(Plugin(), "needs-path-plugin")
    path = write(tmp_path, "r.yaml", "plugins: [needs_path]\nneeds_path: {weight: 2}\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert info.value.key == "needs_path.path"
    assert "required value missing" in str(info.value)
    assert load_recipe(path, ["needs_path.path=/x"]).needs_path.path == "/x"


def test_cycles_yaml_errors_and_unknown_files(tmp_path):
    write(tmp_path, "a.yaml", "defaults: [b.yaml]\n")
    write(tmp_path, "b.yaml", "defaults: [a.yaml]\n")
    with pytest.raises(RecipeError, match="cycle: .*a.yaml -> .*b.yaml -> .*a.yaml"):
        load_recipe(tmp_path / "a.yaml")
    bad = write(tmp_path, "broken.yaml", "plugins: [cmrm\n")
    with pytest.raises(RecipeError, match=r"broken.yaml: not valid YAML"):
        load_recipe(bad)
    listy = write(tmp_path, "list.yaml", "- 1\n- 2\n")
    with pytest.raises(RecipeError, match="must be a mapping at the top level"):
        load_recipe(listy)
    with pytest.raises(RecipeError, match="recipe file not found: .*nothere.yaml"):
        load_recipe(tmp_path / "nothere.yaml")
    with pytest.raises(RecipeError, match="unknown recipe 'nothere'; available recipes: .*cmrm_llava15_dataset"):
        load_recipe("nothere")


def test_recipe_from_dict_validates_like_a_file():
    recipe = recipe_from_dict({"plugins": ["cmrm"], "cmrm": {"alpha": 0.3}}, name="inline")
    assert recipe.cmrm.alpha == 0.3 and recipe.name == "inline"
    with pytest.raises(RecipeError, match="inline: key 'cmrm.alpah'"):
        recipe_from_dict({"plugins": ["cmrm"], "cmrm": {"alpah": 0.3}}, name="inline")


def test_installed_recipes_are_package_data():
    """The recipes ship inside the package (importlib.resources finds them)."""
    from importlib import resources

    folder = resources.files("lvlm_safety_plugins.recipes")
    assert folder.joinpath("cmrm_llava15_dataset.yaml").is_file()
