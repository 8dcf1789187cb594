"""``jquant recipes [list | show NAME]``: the shipped recipes, or one as YAML."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("recipes", help="list the shipped recipes, or show one")
    p.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    p.add_argument("name", nargs="?", help="recipe name or YAML path (with show)")


def run(args) -> int:
    from jquant.recipe import Recipe

    if args.action == "list":
        for name in Recipe.list_shipped():
            print(f"{name:<18} {Recipe.load(name).description}")
        return 0
    if not args.name:
        raise ValueError("jquant recipes show NAME: give a recipe name or a YAML path")
    print(Recipe.load(args.name).to_yaml(), end="")
    return 0
