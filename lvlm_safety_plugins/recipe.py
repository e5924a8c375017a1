"""Recipes: OmegaConf YAML files that pick methods and configure them.

A recipe file has these top-level keys::

    defaults: [other_recipe, ./relative/file.yaml]   # composed first, in order; later wins
    description: "what this recipe is for"
    plugins: [tga, comparative]                      # methods to activate, in run order
    tga:                                             # one section per method, validated
      layers: "9-17"                                 #   against the method's config dataclass

Composition: every entry of ``defaults`` is loaded (recursively) and merged in order,
then the file itself is merged on top. ``plugins`` lists are joined as an ordered union
across the chain (``~name`` removes a method); every other key follows "later wins".
``key=value`` overrides are applied last; an override of ``plugins`` replaces the list.

Every fragment (file or override) is validated on its own, so an error names the file
the bad key is written in, the dotted key, and the valid choices. Recipes cannot execute
code: only the resolvers in :data:`ALLOWED_RESOLVERS` (OmegaConf's own ``oc.select``,
``oc.decode``, ``oc.create``, ``oc.dict.keys``, ``oc.dict.values``) may appear, whatever
other module registered more with OmegaConf; ``oc.env`` is refused, since a composed
recipe is copied into saved files (vector files, reports) and must not carry an
environment variable (a token) into them. Every interpolation is resolved at load time
so a bad one fails early, naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from .errors import RecipeError, RecipeValueError

if TYPE_CHECKING:  # pragma: no cover
    from .methods.base import Method
    from .plugins import SafetyPluginManager

CORE_KEYS = ("defaults", "description", "plugins")
#: the only resolvers a recipe may use (``${name:...}``); see the module docstring
ALLOWED_RESOLVERS = ("oc.create", "oc.decode", "oc.dict.keys", "oc.dict.values", "oc.select")
_RESOLVER_CALL = re.compile(r"\$\{\s*([A-Za-z_][\w.\-]*)\s*:")
RECIPE_SUFFIXES = (".yaml", ".yml")


@dataclass
class Recipe:
    """A loaded, composed and validated recipe.

    ``config`` is an OmegaConf ``DictConfig`` whose method sections are structured
    configs (typed, no unknown keys). Attribute access is forwarded to it, so
    ``recipe.cmrm.alpha`` works.
    """

    name: str
    path: str | None
    config: DictConfig
    sources: list[str] = field(default_factory=list)

    @property
    def plugins(self) -> list[str]:
        return list(self.config.get("plugins") or [])

    @property
    def description(self) -> str:
        return str(self.config.get("description") or "")

    def uses(self, method: str) -> bool:
        return method in self.plugins

    def section(self, method: str) -> Any:
        if method not in self.config:
            raise RecipeError(f"the recipe has no section {method!r}", self.path or self.name)
        return self.config[method]

    def to_yaml(self) -> str:
        return OmegaConf.to_yaml(self.config)

    def to_dict(self) -> dict[str, Any]:
        return OmegaConf.to_container(self.config, resolve=True, enum_to_str=True)  # type: ignore[return-value]

    def __getattr__(self, item: str) -> Any:
        if item.startswith("_") or item in {"name", "path", "config", "sources"}:
            raise AttributeError(item)
        try:
            return self.config[item]
        except (KeyError, OmegaConfBaseException):
            raise AttributeError(f"recipe {self.name!r} has no key {item!r}") from None


# ---------------------------------------------------------------------------
# Finding recipes
# ---------------------------------------------------------------------------


def _recipe_dirs(pm: "SafetyPluginManager | None") -> list[Any]:
    from .registry import recipe_dirs

    return recipe_dirs(pm)


def available_recipes(pm: "SafetyPluginManager | None" = None) -> dict[str, Any]:
    """Every recipe reachable by name: ``{name: path}`` (a later folder wins)."""
    found: dict[str, Any] = {}
    for folder in _recipe_dirs(pm):
        for entry in sorted(folder.iterdir(), key=lambda e: e.name):
            if entry.is_file() and entry.name.endswith(RECIPE_SUFFIXES):
                found[entry.name.rsplit(".", 1)[0]] = entry
    return found


def find_recipe(name_or_path: str | os.PathLike[str], relative_to: Path | None = None, pm: "SafetyPluginManager | None" = None) -> Any:
    """Resolve a recipe name or path to a readable file (``Path`` or ``Traversable``)."""
    text = os.fspath(name_or_path)
    candidates = [Path(text)]
    if relative_to is not None and not Path(text).is_absolute():
        candidates.insert(0, relative_to / text)
    for cand in candidates:
        if cand.is_file():
            return cand
    looks_like_path = os.sep in text or "/" in text or text.endswith(RECIPE_SUFFIXES)
    recipes = available_recipes(pm)
    stem = Path(text).name.rsplit(".", 1)[0] if text.endswith(RECIPE_SUFFIXES) else text
    if not looks_like_path and stem in recipes:
        return recipes[stem]
    if looks_like_path:
        raise RecipeError(f"recipe file not found: {text}")
    raise RecipeError(
        f"unknown recipe {text!r}; available recipes: {', '.join(sorted(recipes)) or '(none)'}"
    )


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------


def _valid_keys_text(keys: Iterable[str]) -> str:
    return ", ".join(sorted(keys))


def _describe_type(cls: type) -> dict[str, str]:
    out = {}
    for f in dataclasses.fields(cls):
        t = f.type
        if isinstance(t, type) and issubclass(t, enum.Enum):
            out[f.name] = " | ".join(m.name for m in t)
    return out


def _section_error(exc: OmegaConfBaseException, section: str, config_class: type, source: str) -> RecipeError:
    sub = getattr(exc, "full_key", None) or getattr(exc, "key", None) or ""
    key = f"{section}.{sub}" if sub else section
    if isinstance(exc, ConfigKeyError):
        leaf = str(sub).split(".")[-1] if sub else ""
        valid = [f.name for f in dataclasses.fields(config_class)]
        return RecipeError(
            f"unknown key {leaf!r} in section {section!r}; valid keys: {_valid_keys_text(valid)}", source, key
        )
    msg = str(getattr(exc, "msg", None) or exc).splitlines()[0]
    choices = _describe_type(config_class).get(str(sub))
    if choices and "expected one of" not in msg:
        msg += f"; valid choices: {choices}"
    return RecipeError(msg, source, key)


def _check_resolvers(value: Any, source: str, key: str = "") -> None:
    """Refuse every ``${resolver:...}`` not in :data:`ALLOWED_RESOLVERS` (``oc.env``
    with its own reason), naming the file and the dotted key."""
    if isinstance(value, dict):
        for k, v in value.items():
            _check_resolvers(v, source, f"{key}.{k}" if key else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_resolvers(v, source, f"{key}[{i}]")
    elif isinstance(value, str):
        for name in _RESOLVER_CALL.findall(value):
            if name == "oc.env":
                raise RecipeError(
                    "${oc.env:...} is not allowed in a recipe: the composed recipe is saved into output files (vector "
                    "files, reports), which must not carry environment variables; pass the value as an override instead",
                    source, key or None)
            if name not in ALLOWED_RESOLVERS:
                raise RecipeError(f"resolver {name!r} is not allowed in a recipe (allowed: {', '.join(ALLOWED_RESOLVERS)})",
                                  source, key or None)


def _validate_fragment(raw: DictConfig, source: str, methods: dict[str, type["Method"]]) -> DictConfig:
    """Check one file or override fragment; return it with sections typed."""
    _check_resolvers(OmegaConf.to_container(raw, resolve=False), source)
    allowed = set(CORE_KEYS) | set(methods)
    for key in raw.keys():
        if key not in allowed:
            raise RecipeError(
                f"unknown top-level key {key!r}; valid keys: {_valid_keys_text(CORE_KEYS)} "
                f"or a method section ({_valid_keys_text(methods) or 'no methods installed'})",
                source,
                str(key),
            )
    if "plugins" in raw:
        plugins = raw["plugins"]
        if isinstance(plugins, str):
            plugins = [plugins]
        if not isinstance(plugins, (list, ListConfig)):
            raise RecipeError("must be a list of method names", source, "plugins")
        seen: dict[str, int] = {}
        for i, name in enumerate(plugins):
            bare = str(name).lstrip("~")
            if bare not in methods:
                raise RecipeError(
                    f"unknown plugin {bare!r}; installed methods: {_valid_keys_text(methods) or '(none)'}",
                    source,
                    f"plugins[{i}]",
                )
            if str(name) in seen:
                raise RecipeError(f"plugin {bare!r} is listed twice (plugins[{seen[str(name)]}] and plugins[{i}]); "
                                  "a method runs once", source, f"plugins[{i}]")
            seen[str(name)] = i
    if "description" in raw and not isinstance(OmegaConf.to_container(raw, resolve=False)["description"], str):
        raise RecipeError("must be a string", source, "description")
    for section, method in methods.items():
        if section not in raw:
            continue
        if not isinstance(raw[section], (dict, DictConfig)):
            raise RecipeError(f"section {section!r} must be a mapping of keys to values", source, section)
        schema = OmegaConf.structured(method.config_class)
        try:
            OmegaConf.merge(schema, raw[section])
        except OmegaConfBaseException as exc:
            raise _section_error(exc, section, method.config_class, source) from None
    return raw


def _load_yaml(path: Any) -> DictConfig:
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read recipe: {exc}", source) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"not valid YAML: {exc}", source) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"a recipe must be a mapping at the top level, got {type(data).__name__}", source)
    try:
        return OmegaConf.create(data)
    except OmegaConfBaseException as exc:
        raise RecipeError(str(exc).splitlines()[0], source) from None


def _join_plugins(current: list[str], new: Sequence[str]) -> list[str]:
    out = list(current)
    for name in new:
        name = str(name)
        if name.startswith("~"):
            out = [p for p in out if p != name[1:]]
        elif name not in out:
            out.append(name)
    return out


def _compose(
    path: Any,
    methods: dict[str, type["Method"]],
    pm: Any,
    stack: tuple[str, ...],
    raw: DictConfig | None = None,
) -> tuple[list[str], list[tuple[str, DictConfig]]]:
    """Return (plugins, fragments in merge order) for one file and its defaults."""
    source = str(path)
    if source in stack:
        chain = " -> ".join([*stack, source])
        raise RecipeError(f"recipes include each other in a cycle: {chain}", source, "defaults")
    if raw is None:
        raw = _load_yaml(path)
    _validate_fragment(raw, source, methods)
    plugins: list[str] = []
    fragments: list[tuple[str, DictConfig]] = []
    defaults = raw.get("defaults") or []
    if isinstance(defaults, str):
        defaults = [defaults]
    if not isinstance(defaults, (list, ListConfig)):
        raise RecipeError("must be a list of recipe names or paths", source, "defaults")
    base_dir = Path(source).parent if isinstance(path, Path) else None
    for i, entry in enumerate(defaults):
        try:
            dep = find_recipe(str(entry), relative_to=base_dir, pm=pm)
        except RecipeError as exc:
            raise RecipeError(str(exc), source, f"defaults[{i}]") from None
        dep_plugins, dep_fragments = _compose(dep, methods, pm, (*stack, source))
        plugins = _join_plugins(plugins, dep_plugins)
        fragments.extend(dep_fragments)
    own = raw.get("plugins") or []
    if isinstance(own, str):
        own = [own]
    plugins = _join_plugins(plugins, own)
    body = OmegaConf.masked_copy(raw, [k for k in raw.keys() if k not in ("defaults", "plugins")])
    fragments.append((source, body))
    return plugins, fragments


def load_recipe(
    name_or_path: str | os.PathLike[str] | dict[str, Any] | DictConfig,
    overrides: Sequence[str] = (),
    *,
    pm: "SafetyPluginManager | None" = None,
    _name: str | None = None,
) -> Recipe:
    """Load a recipe by name (from the registered recipe folders), by path, or from a
    mapping with the same keys as a recipe file (its ``defaults`` are looked up by name).

    ``overrides`` are ``key=value`` strings (``"cmrm.alpha=0.5"``,
    ``"plugins=[cmrm]"``) applied last. Raises :class:`RecipeError` naming the file (or
    override), the dotted key and the valid choices on any problem.
    """
    from .registry import methods as registered_methods

    methods = registered_methods(pm)
    if isinstance(name_or_path, (dict, DictConfig)):
        path: Any = Path(_name) if _name else Path("<dict>")
        try:
            raw = OmegaConf.create(dict(name_or_path) if isinstance(name_or_path, dict) else name_or_path)
        except OmegaConfBaseException as exc:
            raise RecipeError(str(exc).splitlines()[0], str(path)) from None
        plugins, fragments = _compose(path, methods, pm, (), raw=raw)
    else:
        path = find_recipe(name_or_path, pm=pm)
        plugins, fragments = _compose(path, methods, pm, ())
    for item in overrides:
        source = f"override {item!r}"
        if "=" not in item:
            raise RecipeError("an override must look like key=value", source)
        try:
            frag = OmegaConf.from_dotlist([item])
        except OmegaConfBaseException as exc:
            raise RecipeError(str(exc).splitlines()[0], source) from None
        _validate_fragment(frag, source, methods)
        if "plugins" in frag:
            value = frag["plugins"]
            plugins = [str(value)] if isinstance(value, str) else [str(v) for v in value]
            frag = OmegaConf.masked_copy(frag, [k for k in frag.keys() if k != "plugins"])
        fragments.append((source, frag))

    sections = {s for _, f in fragments for s in f.keys() if s in methods} | set(plugins)
    composed: dict[str, Any] = {"description": "", "plugins": plugins}
    for section in sorted(sections):
        cfg = OmegaConf.structured(methods[section].config_class)
        for source, frag in fragments:
            if section in frag:
                try:
                    cfg = OmegaConf.merge(cfg, frag[section])
                except OmegaConfBaseException as exc:
                    raise _section_error(exc, section, methods[section].config_class, source) from None
        composed[section] = cfg
    for source, frag in fragments:
        if "description" in frag:  # unresolved: it may point into a method section
            composed["description"] = OmegaConf.to_container(frag, resolve=False)["description"]
    config = OmegaConf.create(composed)
    top = str(path)
    try:
        OmegaConf.resolve(config)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        raise RecipeError(f"bad interpolation: {str(exc).splitlines()[0]}", top, str(key) if key else None) from None
    for section in plugins:
        missing = sorted(
            k if k.startswith(f"{section}.") else f"{section}.{k}" for k in OmegaConf.missing_keys(config[section])
        )
        if missing:
            raise RecipeError(
                f"required value missing (set it in the recipe or with an override such as {missing[0]}=...)",
                top,
                missing[0],
            )
        checker = getattr(methods[section].config_class, "check", None)
        if checker is not None:
            try:
                checker(config[section])
            except (ValueError, TypeError) as exc:
                bad_key = getattr(exc, "key", None)
                # name the last fragment that set the key (the one that wins)
                where = top
                for source, frag in fragments:
                    sec = frag.get(section)
                    if isinstance(sec, DictConfig) and (bad_key is None or bad_key in sec):
                        where = source
                # a RecipeError that is also a ConfigValueError, the check's error chained
                raise RecipeValueError(str(exc), where, f"{section}.{bad_key}" if bad_key else section) from exc
    OmegaConf.set_readonly(config, False)
    name = Path(str(path)).name.rsplit(".", 1)[0] if str(path).endswith(RECIPE_SUFFIXES) else str(path)
    return Recipe(name=name, path=top, config=config, sources=[s for s, _ in fragments])


def recipe_from_dict(data: dict[str, Any], *, name: str = "<dict>", overrides: Sequence[str] = (), pm: "SafetyPluginManager | None" = None) -> Recipe:
    """Build a recipe from a plain mapping, validated exactly like a file; errors name
    ``name`` as the source."""
    recipe = load_recipe(data, overrides, pm=pm, _name=name)
    recipe.path = None
    recipe.name = name
    return recipe


def as_recipe(
    recipe: "Recipe | str | os.PathLike[str] | Mapping[str, Any]",
    overrides: Sequence[str] = (),
    *,
    pm: "SafetyPluginManager | None" = None,
) -> Recipe:
    """A loaded recipe from a name, a path, a mapping with a recipe's keys, or a loaded
    :class:`Recipe` (returned as it is when there are no ``overrides``), with the
    ``overrides`` applied."""
    if isinstance(recipe, Recipe):
        return load_recipe(recipe.to_dict(), overrides, pm=pm, _name=recipe.name) if overrides else recipe
    return load_recipe(dict(recipe) if isinstance(recipe, Mapping) else recipe, overrides, pm=pm)


__all__ = ["ALLOWED_RESOLVERS", "Recipe", "as_recipe", "available_recipes", "find_recipe", "load_recipe", "recipe_from_dict"]
