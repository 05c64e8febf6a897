"""Where model code lives: user files versus libraries, and rewritten functions' real lines.

graphopt reports break sites, hazards and segments at the model line that produced them, for
any user file, and never touches code of Paddle or another installed library. Functions that
graphopt rewrites in memory (see ``graphopt.passes.branch_normalizer``) are compiled under a
made-up file name; :func:`register_rewrite` records how its lines map back to the user's file,
and :func:`original_location` translates.
"""

from __future__ import annotations

import functools
import io
import linecache
import os
import re
import sys
import sysconfig
import tokenize
from dataclasses import dataclass
from pathlib import Path

#: ``File "<path>", line <n>, in <function>`` as Python tracebacks, SOT break reasons and
#: Paddle's ``op_callstack`` attribute write a frame.
FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>\S+)')

_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # .../graphopt
_OWN_MODELS = _PACKAGE_DIR / "models"
_LIBRARY_DIRS = tuple(
    str(Path(p).resolve())
    for p in {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
)


@dataclass(frozen=True)
class Rewrite:
    """A function graphopt compiled from rewritten source: its file and line map."""

    original_file: str
    #: line in the rewritten source -> line in the original file
    line_map: dict[int, int]


_REWRITES: dict[str, Rewrite] = {}


def register_rewrite(fake_file: str, original_file: str, line_map: dict[int, int]) -> None:
    """Record that code compiled as `fake_file` comes from `original_file` (lines mapped)."""
    _REWRITES[fake_file] = Rewrite(original_file, dict(line_map))


def original_location(file: str, line: int) -> tuple[str, int]:
    """The user's file and line for a frame, translating graphopt's rewritten functions."""
    rw = _REWRITES.get(file)
    if rw is None:
        return file, line
    return rw.original_file, rw.line_map.get(line, line)


def is_rewritten(file: str) -> bool:
    """Whether `file` is the made-up name of a function graphopt rewrote."""
    return file in _REWRITES


def is_library_file(path: str) -> bool:
    """Code graphopt must never patch nor blame: Paddle, the standard library, any installed
    package, and graphopt's own machinery (its built-in models excepted)."""
    if not path or (path.startswith("<") and not is_rewritten(path)):
        return True
    if is_rewritten(path):
        path = _REWRITES[path].original_file
    return _is_library_path(path)


#: directories of the model's own code: user code even when installed as a package
_USER_ROOTS: set[Path] = set()


def add_user_code(module_name: str) -> Path | None:
    """Count the top-level package of `module_name` as the user's code (patched, blamed).

    A model installed with pip (a FastDeploy checkout, a package exposing a ``graphopt.models``
    entry point) lives under ``site-packages``, which otherwise counts as library code. Paddle
    and graphopt's machinery are never added. Returns the directory added, or None.
    """
    top = module_name.split(".")[0]
    module = sys.modules.get(top)
    file = getattr(module, "__file__", None)
    if not file or top in ("paddle", "graphopt", "builtins"):
        return None
    root = Path(file).resolve().parent if Path(file).name == "__init__.py" else Path(file).resolve()
    if str(root).startswith(_LIBRARY_DIRS) and "site-packages" not in str(root) \
            and "dist-packages" not in str(root):
        return None  # the standard library
    if root not in _USER_ROOTS:
        _USER_ROOTS.add(root)
        _is_library_path.cache_clear()
    return root


@functools.lru_cache(maxsize=4096)
def _is_library_path(path: str) -> bool:
    # resolving a path costs system calls, and a deep program names the same few files for
    # each of its thousands of ops
    try:
        resolved = Path(path).resolve()
    except OSError:
        return True
    text = str(resolved)
    if any(root == resolved or root in resolved.parents for root in _USER_ROOTS):
        return False
    if _PACKAGE_DIR in resolved.parents:
        return _OWN_MODELS not in resolved.parents
    return "site-packages" in text or "dist-packages" in text or text.startswith(_LIBRARY_DIRS)


def display_path(path: str) -> str:
    """A short form of a source path for messages: relative to the working directory when
    under it, ``graphopt/...`` for graphopt's own files, else as given."""
    try:
        resolved = Path(path).resolve()
    except OSError:
        return path
    if _PACKAGE_DIR in resolved.parents:
        return str(resolved.relative_to(_PACKAGE_DIR.parent))
    cwd = Path(os.getcwd()).resolve()
    if cwd in resolved.parents:
        return str(resolved.relative_to(cwd))
    return path


def user_frames(text: str) -> list[tuple[str, int, str]]:
    """``(file, line, function)`` of every frame named in `text` that is user code, outermost
    first, with rewritten functions translated back to the user's file and line."""
    out = []
    for m in FRAME.finditer(text):
        file, line = original_location(m.group("file"), int(m.group("line")))
        if not is_library_file(file):
            out.append((file, line, m.group("func")))
    return out


def format_location(file: str, line: int, function: str = "") -> str:
    """``path:line (function)`` for reports and messages."""
    where = f"{display_path(file)}:{line}"
    return f"{where} ({function})" if function else where


def source_line(file: str, line: int) -> str:
    """The code on one line of a source file, without indentation and comment ('' if the file
    cannot be read)."""
    text = linecache.getline(file, line).strip()
    if "#" not in text:
        return text
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, SyntaxError):  # a line continued elsewhere: keep it as it is
        return text
    comment = next((t for t in tokens if t.type == tokenize.COMMENT), None)
    return text[: comment.start[1]].rstrip() if comment is not None else text
