"""Write the generated parts of the documentation: the models table (docs/models.md) and the recipes table
(docs/training.md), each between its markers, the command-line reference (docs/cli.md), all from the code itself,
and docs/changelog.md (CHANGELOG.md).

    python docs/generate.py           # rewrite them
    python docs/generate.py --check   # exit 1 with a diff when either is stale
"""
from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
BEGIN, END = "<!-- BEGIN GENERATED: models table (python docs/generate.py) -->", "<!-- END GENERATED -->"
RECIPES_BEGIN = "<!-- BEGIN GENERATED: recipes table (python docs/generate.py) -->"

FAMILIES = {"alexnet": "AlexNet", "vgg": "VGG", "nin": "NiN", "googlenet": "GoogLeNet", "resnet": "ResNet",
            "csp": "CSP", "densenet": "DenseNet"}


def _size(shape) -> str:
    return "x".join(str(s) for s in shape)


def _flops(flops: int) -> str:
    return f"{flops / 1e9:.2f} G" if flops >= 1e9 else f"{flops / 1e6:.1f} M"


def models_table() -> str:
    import torch
    from moderncnn.models import create_model, list_models
    from moderncnn.report.summary import count_parameters, summary

    pretrained = set(list_models(pretrained=True))
    lines = ["| model | family | parameters | FLOPs at the default input | default input | minimum input | "
             "ImageNet weights |", "|---|---|---:|---:|---|---|---|"]
    torch.manual_seed(0)
    for name in list_models():
        model = create_model(name).eval()
        family = "CSP" if name.startswith("csp") else FAMILIES[type(model).__module__.rsplit(".", 1)[-1]]
        with torch.no_grad():
            flops = summary(model, (1, *model.default_input_size)).total_flops
        lines.append(f"| `{name}` | {family} | {count_parameters(model):,} | {_flops(flops)} | "
                     f"{_size(model.default_input_size)} | {_size(model.min_input_size)} | "
                     f"{'yes' if name in pretrained else ''} |")
    return "\n".join(lines) + "\n"


def _flag_line(action: argparse.Action) -> str:
    if action.option_strings:
        names = ", ".join(f"`{s}`" if action.nargs == 0 else f"`{s} {action.metavar or action.dest.upper()}`"
                          for s in action.option_strings)
    else:
        names = f"`{action.metavar or action.dest}`"
    help_text = (action.help or "").replace("%%", "%")
    if action.choices and not isinstance(action, argparse._SubParsersAction):
        help_text += f" (one of: {', '.join(map(str, action.choices))})"
    return f"- {names}: {help_text}"


def cli_reference() -> str:
    from moderncnn.cli import COMMANDS, build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = ["# Command-line reference", "",
           "Generated from the parsers by `python docs/generate.py`; `moderncnn COMMAND --help` prints the same.",
           "A train flag left out takes the recipe's value (the default recipe is `fast`); flags given win.", ""]
    for name, (help_text, _, _) in COMMANDS.items():
        out += [f"## moderncnn {name}", "", help_text[0].upper() + help_text[1:] + ".", ""]
        for action in sub.choices[name]._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue
            out.append(_flag_line(action))
        out.append("")
    return "\n".join(out)


def _setting(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return str(value).lower() if isinstance(value, bool) else str(value)


def recipes_table() -> str:
    from moderncnn.training.config import RECIPES

    lines = ["| recipe | purpose | settings | only for the recipe's own model |", "|---|---|---|---|"]
    for name, recipe in RECIPES.items():
        settings = "; ".join(f"{k}={_setting(v)}" for k, v in recipe.settings.items())
        own = "; ".join(f"{k}={_setting(v)}" for k, v in recipe.model_options.items())
        lines.append(f"| `{name}`{' (default)' if name == 'fast' else ''} | {recipe.purpose} | {settings} | {own} |")
    return "\n".join(lines) + "\n"


def _between_markers(page: Path, begin: str, generated: str) -> str:
    text = page.read_text()
    if begin not in text or END not in text.split(begin, 1)[-1]:
        raise SystemExit(f"{page}: the markers of the generated table are missing")
    head, rest = text.split(begin, 1)
    return f"{head}{begin}\n{generated}{END}{rest.split(END, 1)[1]}"


def render() -> dict:
    """{path: the text it should hold}."""
    changelog = (DOCS.parent / "CHANGELOG.md").read_text()
    return {DOCS / "models.md": _between_markers(DOCS / "models.md", BEGIN, models_table()),
            DOCS / "training.md": _between_markers(DOCS / "training.md", RECIPES_BEGIN, recipes_table()),
            DOCS / "cli.md": cli_reference(), DOCS / "changelog.md": changelog}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 with a diff when a generated page is stale")
    args = parser.parse_args(argv)
    stale = 0
    for path, text in render().items():
        current = path.read_text() if path.exists() else ""
        if current == text:
            continue
        if args.check:
            stale += 1
            sys.stdout.writelines(difflib.unified_diff(current.splitlines(True), text.splitlines(True),
                                                       str(path), f"{path} (generated)"))
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"\n{stale} generated page(s) are stale: run python docs/generate.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
