"""Write the generated reference pages: configuration from ``core.settings.FIELDS`` and the CLI
from the Typer app, so neither can drift from the code. ``make docs`` runs this before
``mkdocs build --strict``; ``--check`` exits 1 when a committed page is stale."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer.main

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(__file__).resolve().parent / "reference"


def configuration_page() -> str:
    from core.settings import FIELDS

    lines = [
        "# Configuration reference",
        "",
        "Generated from `core/settings.py` by `docs/gen_reference.py`: every variable tidemill",
        "reads, its default and what it does. Unset variables take the default; an empty",
        "default means the feature is off or the embedded server is used.",
        "",
        "| variable | default | meaning |",
        "|---|---|---|",
    ]
    for field in FIELDS:
        default = f"`{field.default}`" if field.default else ""
        meaning = field.help.replace("|", "\\|")
        lines.append(f"| `{field.env}` | {default} | {meaning} |")
    return "\n".join(lines) + "\n"


def _walk(cmd: Any, path: list[str]) -> list[tuple[list[str], Any]]:
    # Duck-typed: Typer may bring click or a vendored copy of it.
    found = [(path, cmd)]
    if hasattr(cmd, "commands"):
        for name in sorted(cmd.commands):
            found.extend(_walk(cmd.commands[name], [*path, name]))
    return found


def cli_page() -> str:
    from cli.main import app

    root = typer.main.get_command(app)
    lines = [
        "# CLI reference",
        "",
        "Generated from the Typer app by `docs/gen_reference.py`; `tidemill COMMAND --help`",
        "prints the same.",
        "",
    ]
    for path, cmd in _walk(root, ["tidemill"]):
        if cmd.hidden:
            continue
        ctx = cmd.context_class(cmd, info_name=" ".join(path))
        usage = " ".join(cmd.collect_usage_pieces(ctx))
        lines += [f"## `{' '.join(path)}`", ""]
        if cmd.help:
            lines += [cmd.help.strip().split("\b")[0].strip(), ""]
        lines += ["```text", f"{' '.join(path)} {usage}".rstrip(), "```", ""]
        params = [p for p in cmd.params if not getattr(p, "hidden", False)]
        if params and not hasattr(cmd, "commands"):
            lines += ["| argument / option | help |", "|---|---|"]
            for param in params:
                if param.param_type_name == "option":
                    names = ", ".join(f"`{o}`" for o in [*param.opts, *param.secondary_opts])
                    help_text = param.help or ""
                    if param.default not in (None, False, (), []) and not param.is_flag:
                        help_text += f" (default: `{param.default}`)"
                else:
                    names = f"`{(param.metavar or param.name or '').upper()}`"
                    help_text = getattr(param, "help", "") or ""
                cell = help_text.replace("|", "\\|")
                lines.append(f"| {names} | {cell} |")
            lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(ROOT))
    pages = {"configuration.md": configuration_page(), "cli.md": cli_page()}
    stale = []
    OUT.mkdir(exist_ok=True)
    for name, text in pages.items():
        target = OUT / name
        if "--check" in argv:
            if not target.exists() or target.read_text() != text:
                stale.append(name)
        else:
            target.write_text(text)
    if stale:
        print(f"stale generated pages: {', '.join(stale)} (run `make docs`)")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
