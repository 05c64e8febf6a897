"""A small FileCheck (LLVM style) for golden program text.

Directives, one per line, matched in order against the text's lines:

* ``CHECK: pat`` -- a later line contains `pat`;
* ``CHECK-NEXT: pat`` -- the very next line contains `pat`;
* ``CHECK-NOT: pat`` -- no line between the previous match and the next one (or the end)
  contains `pat`.

In a pattern, ``[[NAME:regex]]`` captures what `regex` matched and ``[[NAME]]`` must match it
again (so value numbers need not be spelled out); ``{{regex}}`` is a bare regex; everything else
is literal text.
"""

from __future__ import annotations

import re

_TOKEN = re.compile(r"\[\[(\w+)(?::(.*?))?\]\]|\{\{(.*?)\}\}")


def _regex(pattern: str, names: dict[str, str]) -> tuple[re.Pattern[str], list[str]]:
    out, captures, pos = [], [], 0
    for m in _TOKEN.finditer(pattern):
        out.append(re.escape(pattern[pos:m.start()]))
        name, define, bare = m.groups()
        if bare is not None:
            out.append(f"(?:{bare})")
        elif define is not None:
            out.append(f"({define})")
            captures.append(name)
        else:
            if name not in names:
                raise AssertionError(f"FileCheck: [[{name}]] used before it was captured")
            out.append(re.escape(names[name]))
        pos = m.end()
    out.append(re.escape(pattern[pos:]))
    return re.compile("".join(out)), captures


def filecheck(text: str, spec: str) -> None:
    """Assert that `text` satisfies the directives in `spec` (see the module docstring)."""
    lines = text.splitlines()
    names: dict[str, str] = {}
    pos = 0
    pending_not: list[str] = []

    def check_nots(end: int) -> None:
        for pat in pending_not:
            rx, _ = _regex(pat, names)
            for i in range(pos, end):
                if rx.search(lines[i]):
                    raise AssertionError(f"FileCheck: CHECK-NOT: {pat!r} matched line {i + 1}: "
                                         f"{lines[i].strip()}")
        pending_not.clear()

    for raw in spec.strip().splitlines():
        directive = raw.strip()
        if not directive:
            continue
        kind, _, pattern = directive.partition(":")
        pattern = pattern.strip()
        if kind == "CHECK-NOT":
            pending_not.append(pattern)
            continue
        rx, captures = _regex(pattern, names)
        if kind == "CHECK-NEXT":
            candidates = [pos] if pos < len(lines) else []
        elif kind == "CHECK":
            candidates = list(range(pos, len(lines)))
        else:
            raise AssertionError(f"FileCheck: unknown directive {directive!r}")
        for i in candidates:
            m = rx.search(lines[i])
            if m:
                check_nots(i)
                names.update(zip(captures, m.groups(), strict=False))
                pos = i + 1
                break
        else:
            where = lines[pos].strip() if pos < len(lines) else "<end of text>"
            raise AssertionError(f"FileCheck: {kind}: {pattern!r} not found from line {pos + 1} "
                                 f"({where})")
    check_nots(len(lines))
