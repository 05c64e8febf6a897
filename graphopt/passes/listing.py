"""``graphopt-passes`` / ``list_passes=true``: every registered pass with its options.

For each pass: name, stage, one-line summary, requires/ensures, ordering constraints, and every
option with its type, default and help — enough to write a pipeline config without reading code.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence

from graphopt.errors import ConfigError
from graphopt.passes.base import Pass
from graphopt.passes.options import default_value, field_types, option_help, type_name
from graphopt.passes.registry import all_passes, get_pass


def describe_pass(pass_cls: type[Pass]) -> str:
    """The listing entry of one pass (several lines, no trailing newline)."""
    lines = [f"{pass_cls.name}  [{pass_cls.stage.value}]", f"    {pass_cls.summary.strip()}"]

    def join(items: Sequence[str]) -> str:
        return ", ".join(items) if items else "-"

    lines.append(f"    requires: {join(pass_cls.requires)}    ensures: {join(pass_cls.ensures)}")
    if pass_cls.must_run_after or pass_cls.must_run_before:
        lines.append(
            f"    runs after: {join(pass_cls.must_run_after)}    "
            f"runs before: {join(pass_cls.must_run_before)}"
        )
    fields = pass_cls.option_fields()
    if not fields:
        lines.append("    options: none")
        return "\n".join(lines)
    lines.append("    options:")
    types_ = field_types(pass_cls.Options)
    for f in fields:
        default = default_value(f)
        shown = "(required)" if default is dataclasses.MISSING else f"= {default!r}"
        lines.append(f"      {f.name}: {type_name(types_[f.name])} {shown}")
        text = option_help(pass_cls.Options, f.name)
        if text:
            lines.append(f"          {text}")
    return "\n".join(lines)


def describe_passes(names: Sequence[str] | None = None) -> str:
    """The listing of the given passes (default: every registered pass, sorted by name)."""
    classes = [get_pass(n) for n in names] if names else list(all_passes().values())
    if not classes:
        return "no passes registered"
    header = f"{len(classes)} registered pass{'es' if len(classes) != 1 else ''}:"
    return header + "\n\n" + "\n\n".join(describe_pass(c) for c in classes)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the pass listing; ``graphopt-passes [NAME ...]`` shows only the named passes."""
    parser = argparse.ArgumentParser(
        prog="graphopt-passes", description="List graphopt passes with their options."
    )
    parser.add_argument("names", nargs="*", help="only these passes")
    args = parser.parse_args(argv)
    try:
        print(describe_passes(args.names))
        sys.stdout.flush()
    except ConfigError as e:
        print(f"graphopt-passes: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `graphopt-passes | head`: the reader has what it wanted. Point stdout at /dev/null so
        # the flush at exit does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return 0


if __name__ == "__main__":
    sys.exit(main())
