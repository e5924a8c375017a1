"""The ``lvlm-safety`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from .version import __version__
from .errors import LVLMSafetyError


def _print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    print(line)
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))


def cmd_plugins_list(args: argparse.Namespace) -> int:
    from .plugins import get_plugin_manager
    from .registry import methods

    pm = get_plugin_manager()
    infos = pm.plugin_infos()
    method_classes = methods(pm)
    if args.json:
        print(json.dumps(
            {
                "plugins": [
                    {"name": i.name, "package": i.package, "version": i.version, "hooks": list(i.hooks), "builtin": i.builtin}
                    for i in infos
                ],
                "methods": {n: {"kind": c.kind, "module": c.__module__} for n, c in method_classes.items()},
            },
            indent=2,
        ))
        return 0
    _print_table([[i.name, i.package, i.version, ", ".join(i.hooks)] for i in infos], ["plugin", "package", "version", "hooks"])
    print()
    _print_table([[n, c.kind, c.description] for n, c in sorted(method_classes.items())], ["method", "kind", "description"])
    return 0


def cmd_recipes_list(args: argparse.Namespace) -> int:
    from .recipe import available_recipes, load_recipe

    found = available_recipes()
    rows = []
    for name, path in sorted(found.items()):
        try:
            recipe = load_recipe(path)
            rows.append([name, ",".join(recipe.plugins), recipe.description])
        except LVLMSafetyError as exc:
            rows.append([name, "?", f"INVALID: {exc}"])
    if args.json:
        print(json.dumps([{"name": r[0], "plugins": r[1].split(","), "description": r[2]} for r in rows], indent=2))
    else:
        _print_table(rows, ["recipe", "plugins", "description"])
    return 0


def cmd_recipes_show(args: argparse.Namespace) -> int:
    from .recipe import load_recipe

    recipe = load_recipe(args.name, args.overrides)
    if args.json:
        print(json.dumps(recipe.to_dict(), indent=2))
    else:
        print(f"# recipe {recipe.name} composed from: {', '.join(recipe.sources)}")
        print(recipe.to_yaml(), end="")
    return 0


def cmd_recipes_validate(args: argparse.Namespace) -> int:
    from .recipe import load_recipe

    recipe = load_recipe(args.path, args.overrides)
    print(f"{args.path}: OK (plugins: {', '.join(recipe.plugins) or 'none'})")
    return 0


def add_plugins_command(sub: Any) -> None:
    plugins = sub.add_parser("plugins", help="installed plugins")
    psub = plugins.add_subparsers(dest="plugins_command", metavar="SUBCOMMAND")
    p = psub.add_parser("list", help="list plugins (name, package, version, hooks) and methods")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_plugins_list)


def add_recipes_command(sub: Any) -> None:
    recipes = sub.add_parser("recipes", help="recipes: list, show, validate")
    rsub = recipes.add_subparsers(dest="recipes_command", metavar="SUBCOMMAND")
    r = rsub.add_parser("list", help="list recipes reachable by name")
    r.add_argument("--json", action="store_true", help="print JSON")
    r.set_defaults(func=cmd_recipes_list)
    r = rsub.add_parser("show", help="show a composed recipe")
    r.add_argument("name", help="recipe name or path")
    r.add_argument("overrides", nargs="*", help="key=value overrides, e.g. cmrm.alpha=0.5")
    r.add_argument("--json", action="store_true", help="print JSON")
    r.set_defaults(func=cmd_recipes_show)
    r = rsub.add_parser("validate", help="validate a recipe file")
    r.add_argument("path", help="recipe file (or name)")
    r.add_argument("overrides", nargs="*", help="key=value overrides")
    r.set_defaults(func=cmd_recipes_validate)


def build_parser(pm: Any = None) -> argparse.ArgumentParser:
    """The ``lvlm-safety`` parser: one subcommand per ``register_commands``
    registration (the built-in commands come from the same hook, in
    ``lvlm_safety_plugins.commands_builtin``)."""
    from .errors import PluginError
    from .registry import commands

    parser = argparse.ArgumentParser(
        prog="lvlm-safety",
        description="Safety plugins for vision-language models: TGA, CMRM, comparative loss.",
    )
    parser.add_argument("--version", action="version", version=f"lvlm-safety-plugins {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, add_command in sorted(commands(pm).items()):
        before = set(sub.choices)
        try:
            add_command(sub)
        except (argparse.ArgumentError, ValueError) as exc:
            raise PluginError(name, "register_commands", exc) from exc
        if name not in sub.choices:
            added = sorted(set(sub.choices) - before)
            raise PluginError(name, "register_commands", LookupError(
                f"add_command for {name!r} must add the subcommand {name!r}; it added {added or 'nothing'}"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()  # a plugin that cannot be loaded or adds a bad command fails here
        args = parser.parse_args(argv)
        func = getattr(args, "func", None)
        if func is None:
            # a group without its subcommand: show that group's help
            parser.parse_args([args.command, "--help"] if args.command else ["--help"])
            return 2
        return int(func(args) or 0)
    except LVLMSafetyError as exc:  # one line, multi-line messages joined
        message = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
        print(f"lvlm-safety: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # pragma: no cover - interactive
        print("lvlm-safety: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
