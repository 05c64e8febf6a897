"""The command line: ``python tools/optimize.py model=dsv3 full_cuda_graph=false``.

Hydra reports a bad override with several lines and exit code 1; graphopt promises one line and
exit code 2. So the config is composed and validated up front with the user's overrides
(cheap: no model is built) and any error becomes one line; then Hydra runs as usual.
``HYDRA_FULL_ERROR=1`` skips this and shows every traceback.

The run directory is checked in the same preflight, before Hydra writes anything to it: it must
be writable, must not hold a finished run (``overwrite=true`` replaces one) and must not be
locked by a live run; this process then holds its lock until it exits.

Interrupts: Ctrl-C (SIGINT) or SIGTERM end the run with one line on stderr and exit 130 (143).
The handler exits at once instead of raising KeyboardInterrupt, because SOT catches that
exception inside the trace and carries on with a wrapped error; it first removes the temp files
of atomic writes in flight, so no half-written file is left, and skips Paddle's exit hooks,
which would print SOT's debug dump.

Output: a closed stdout pipe (``| head``) ends the output, not the run; every printed line also
goes to the run's ``cli.log``; progress lines show only on a terminal.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any, TextIO

import hydra
from hydra import compose, initialize_config_module
from hydra._internal.utils import get_args_parser
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import MissingConfigException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig
from paddle.jit.sot.utils.info_collector import InfoCollector

from graphopt.config import SCHEMA_SUFFIX, config_warnings, register_configs, validate
from graphopt.driver import optimize
from graphopt.errors import ConfigError, GraphoptError, VerificationError, one_line
from graphopt.passes.listing import describe_passes
from graphopt.report import progress
from graphopt.report.report import write_atomic
from graphopt.report.rundir import (
    FINISHED_MARKERS,
    RunDirError,
    RunDirLock,
    check_run_dir,
    clear_outputs,
    remove_pending,
)

CONFIG_MODULE = "graphopt.conf"
register_configs()


def _hydra_one_line(e: Exception) -> str:
    if isinstance(e, MissingConfigException) and getattr(e, "options", None):
        group = os.path.dirname(e.missing_cfg_file or "") or "config"
        name = os.path.basename(e.missing_cfg_file or "")
        options = sorted(o for o in e.options if not o.endswith(SCHEMA_SUFFIX))
        return f"unknown {group} '{name}': choose one of {', '.join(options)}"
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    keep = [ln for ln in lines if not ln.startswith(("full_key:", "object_type", "Set the env"))]
    text = " ".join(keep[:2]) if keep else type(e).__name__
    cause = e.__cause__
    if text.startswith("Error merging override") and cause is not None:
        # Hydra's own line names the override only; OmegaConf's cause says what is wrong
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        key = getattr(cause, "full_key", None)
        if first:
            text = f"{key}: {first}" if key else f"{text}: {first}"
    return text


def check_grammar(argv: list[str]) -> None:
    """Raise a one-line ConfigError for the slips Hydra's grammar reports as a usage page or a
    parser trace: a dashed override (``--model=tiny``), spaces around '=' (``model = tiny``), a
    word that is no override, and an unquoted value Hydra's lexer cannot read (non-ASCII)."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            known, unknown = get_args_parser().parse_known_args(argv)
    except SystemExit:  # a malformed Hydra flag (``--cfg nope``): Hydra reports it itself
        return
    _check_dashed(argv, unknown)
    _check_words(list(known.overrides))


def _check_dashed(argv: list[str], unknown: list[str]) -> None:
    """``--model=tiny`` / ``--model tiny``: Hydra has no such flag; overrides take no dashes."""
    for arg in unknown:
        if not arg.startswith("-"):
            continue
        key, eq, value = arg.lstrip("-").partition("=")
        if not eq:
            i = argv.index(arg)
            after = argv[i + 1] if i + 1 < len(argv) else ""
            value = after if after and "=" not in after and not after.startswith("-") else "..."
        raise ConfigError(f"{arg}: not an option; overrides are written without dashes: "
                          f"{key}={value} (Hydra's own options: --help)")


def _glued(words: list[str]) -> list[list[str]]:
    """`words` grouped into overrides: the pieces of ``key = value`` (spaces around '=') go
    into one group."""
    out: list[list[str]] = []
    for w in words:
        last = "".join(out[-1]) if out else ""
        if out and ((w.startswith("=") and "=" not in last)
                    or (last.endswith("=") and "=" not in w and not w.startswith("~"))):
            out[-1].append(w)
        else:
            out.append([w])
    return out


def _check_words(overrides: list[str]) -> None:
    """Each override is one word ``key=value`` (``~key`` deletes) that Hydra's lexer reads."""
    for pieces in _glued(overrides):
        if len(pieces) > 1:
            raise ConfigError(f"'{' '.join(pieces)}': write {''.join(pieces)} as one word, with "
                              "no spaces around '='")
    parser = OverridesParser.create()
    for word in overrides:
        if "=" not in word and not word.startswith("~"):
            raise ConfigError(f"'{word}' is not an override: write key=value, e.g. model=tiny "
                              "(no spaces around '=')")
        try:
            parser.parse_overrides([word])
        except Exception:
            key, _, value = word.partition("=")
            # a list or a sweep would become one string if quoted whole: left to Hydra's line
            if (value and not value.isascii() and not value.startswith(("[", "{"))
                    and not any(c in value for c in "\"',")):
                raise ConfigError(f"{key}: Hydra reads a value with non-ASCII characters only "
                                  f"quoted: write '{key}=\"{value}\"' (quotes included)") \
                    from None
            # anything else: check_config reports Hydra's own parse error as one line


def _search_path(overrides: list[str]) -> list[str]:
    """The user's ``hydra.searchpath=[...]`` override, if any, to compose with it too."""
    return [o for o in overrides if o.lstrip("+").startswith("hydra.searchpath=")]


def preflight(argv: list[str]) -> str | None:
    """Compose and validate the config with the user's overrides, and check the run directory
    (creating it); the error as one line, or None."""
    try:
        check_argv(argv)
    except (ConfigError, RunDirError) as e:
        return str(e)
    return None


def check_argv(argv: list[str], config: bool = True) -> Path | None:
    """:func:`check_config` (unless not `config`), then the run directory; return it (None:
    Hydra's own mode, e.g. a sweep or ``--cfg``, which is checked per job or writes nothing)."""
    check_grammar(argv)
    if config and check_config(argv) is None:
        return None
    if not config and _hydra_mode(argv):
        return None
    overrides = [a for a in argv if not a.startswith("-") and "=" in a]
    run_dir = _run_dir_of(overrides)
    if run_dir is None:
        return None
    flags = _flags(overrides)
    _STATE["made"] = _first_missing(run_dir.expanduser().absolute())
    return check_run_dir(run_dir, overwrite=flags.get("overwrite", False))


def _first_missing(path: Path) -> Path | None:
    """The outermost directory of `path` that does not exist yet (None: it all exists)."""
    missing = None
    while not path.exists() and path != path.parent:
        missing, path = path, path.parent
    return missing


def _drop_unused_run_dir(run_dir: Path) -> None:
    """A run that stopped before Hydra wrote anything (its own usage error, say) leaves no
    directory holding only a lock: release the lock, then remove the directories this process
    made, if they are empty."""
    lock = _STATE.get("lock")
    if lock is not None and Path(lock.path).parent == run_dir:
        lock.release()
    made = _STATE.get("made")
    if made is None:
        return
    path = run_dir
    while True:
        try:
            path.rmdir()  # only an empty directory goes
        except OSError:
            return
        if path == made or path == path.parent:
            return
        path = path.parent


def _flags(overrides: list[str]) -> dict[str, bool]:
    """The boolean top-level keys the run-dir check needs, as the user set them."""
    out = {}
    for o in overrides:
        key, _, value = o.lstrip("+").partition("=")
        if key in ("overwrite", "list_passes"):
            out[key] = value.strip().lower() in ("true", "yes", "1", "on")
    return out


def _run_dir_of(overrides: list[str]) -> Path | None:
    """``hydra.run.dir`` as Hydra will resolve it (timestamps included), or None if unknown."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
        return Path(str(cfg.hydra.run.dir))
    except Exception:  # an exotic hydra.* override: Hydra checks it itself
        return None
    finally:
        GlobalHydra.instance().clear()


def _hydra_mode(argv: list[str]) -> bool:
    """A sweep (checked per job) or one of Hydra's info flags (nothing runs)."""
    if any(a in ("-m", "--multirun") for a in argv):
        return True
    return any(a in _HYDRA_OWN_FLAGS or a.startswith(_HYDRA_OWN_PREFIXES) for a in argv)


#: Hydra's flags that print something and run nothing, and those that choose another primary
#: config than the one the preflight composes (the run still validates that one itself)
_HYDRA_OWN_FLAGS = frozenset({"-c", "--cfg", "-h", "--help", "--info", "-i", "--hydra-help",
                              "--shell-completion", "-sc", "-cn", "--config-name", "-cp",
                              "--config-path", "-cd", "--config-dir"})
_HYDRA_OWN_PREFIXES = ("--cfg=", "--info=", "--config-name=", "--config-path=", "--config-dir=")


def check_config(argv: list[str]) -> DictConfig | None:
    """Compose and validate the config with the user's overrides; raise one-line ConfigError.

    Returns None (nothing checked) for sweeps (checked per job) and Hydra's info flags.
    """
    check_grammar(argv)
    overrides = [a for a in argv if not a.startswith("-") and "=" in a]
    if _hydra_mode(argv):
        return None
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        if any(o.is_sweep_override() for o in parsed):
            raise ConfigError("a sweep (a,b) needs -m: python tools/optimize.py -m "
                              + " ".join(overrides))
        GlobalHydra.instance().clear()
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            keep = [o for o in overrides if not o.lstrip("+~").startswith("hydra.")]
            cfg = compose(config_name="config", overrides=keep + _search_path(overrides))
        validate(cfg)
    except ConfigError:
        raise
    except Exception as e:  # every Hydra/OmegaConf error becomes one line
        raise ConfigError(_hydra_one_line(e)) from None
    finally:
        GlobalHydra.instance().clear()
    return cfg


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> tuple[int, str]:
    """One job: errors become one line and an exit code (2: bad input, 1: a failed run)."""
    full = os.environ.get("HYDRA_FULL_ERROR") == "1"
    for warning in config_warnings(cfg):
        print(f"graphopt: warning: {warning}", file=sys.stderr)
    try:
        optimize(cfg, run_dir)
        return 0, ""
    except VerificationError as e:
        code, message = 1, f"graphopt: verification failed: {e}"
    except GraphoptError as e:
        if full:
            raise
        code = 2 if isinstance(e, ConfigError) or isinstance(e.__cause__, ConfigError) else 1
        message = f"graphopt: error: {one_line(e)}"
    except OSError as e:  # the disk filled, a mount went read-only: what, where, not a trace
        if full:
            raise
        where = f" {e.filename}" if e.filename else ""
        code, message = 1, (f"graphopt: error: cannot write{where}: {e.strerror or e} (free "
                            "space or pick another hydra.run.dir / cache.dir)")
    finally:
        _forget_sot_info()
    print(message, file=sys.stderr)
    return code, message


def _forget_sot_info() -> None:
    """Drop what SOT collected: its exit hook would print it as a debug dump on stdout."""
    with contextlib.suppress(Exception):
        InfoCollector().clear()


# -- the process: interrupts, a closed stdout, the log, the run directory ----------------------


class _Stream:
    """A text stream that survives a closed pipe and can copy each line to a logger.

    On ``BrokenPipeError`` (``graphopt ... | head``) the stream's descriptor is pointed at
    /dev/null: the output ends quietly and the run goes on.
    """

    def __init__(self, stream: TextIO, logger: logging.Logger | None = None,
                 level: int = logging.INFO) -> None:
        self._stream = stream
        self._logger = logger
        self._level = level
        self._partial = ""

    def _to_devnull(self) -> None:
        with contextlib.suppress(Exception):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)

    def write(self, text: str) -> int:
        if self._logger is not None:
            self._partial += text
            *lines, self._partial = self._partial.split("\n")
            for line in lines:
                if line.strip():
                    self._logger.log(self._level, line)
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._to_devnull()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._to_devnull()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


#: what an interrupt must clean up: the run directory and its lock (and the outermost
#: directory of it this process made, if any)
_STATE: dict[str, Any] = {"run_dir": None, "lock": None, "made": None}
#: when this process started (a file modified since was written by this run)
_STARTED = time.time() - 1.0


def _on_signal(signum: int, frame: Any) -> None:
    """Ctrl-C / SIGTERM: one line, no half-written file, exit 130 / 143 (see module doc)."""
    prog = progress.current()
    prog.stop()
    removed = remove_pending()
    run_dir = _STATE.get("run_dir")
    if run_dir is not None:
        for tmp in _written_by_this_run(Path(run_dir), ".*.tmp*"):  # direct temp writes
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed.append(str(tmp))
    lock = _STATE.get("lock")
    if lock is not None:
        lock.release()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    where = f" during {prog.phase}" if prog.phase else ""
    done = run_dir is not None and all((Path(run_dir) / m).exists() for m in FINISHED_MARKERS)
    name = "interrupted" if signum == signal.SIGINT else f"stopped by signal {signum}"
    text = (f"graphopt: {name}{where} after {prog.elapsed():.1f} s; "
            + (f"{run_dir} holds the finished report.json" if done else
               f"no report written{f' in {run_dir}' if run_dir else ''}"))
    with contextlib.suppress(Exception):
        if sys.__stdout__ is not None and sys.__stdout__.isatty():
            os.write(sys.__stdout__.fileno(), b"\r\x1b[2K\x1b[?25h")  # clear spinner, show cursor
    with contextlib.suppress(Exception):
        os.write(2, (text + "\n").encode())
    os._exit(128 + signum)


def install_signal_handlers() -> None:
    """Ctrl-C and SIGTERM end the run with one line (see module doc)."""
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)


def _claim(run_dir: Path, overwrite: bool) -> None:
    """Lock the run directory for this process; with `overwrite`, drop the finished run's
    report first, so a failing new run leaves no stale report behind."""
    lock = RunDirLock(run_dir).acquire()
    _STATE["run_dir"], _STATE["lock"] = run_dir, lock
    if overwrite:
        clear_outputs(run_dir)


def _pin_run_dir(run_dir: Path) -> None:
    """Make Hydra use the directory the preflight checked (its timestamps resolved once)."""
    text = str(run_dir)
    if "'" in text:
        return
    sys.argv = [a for a in sys.argv if not a.lstrip("+").startswith("hydra.run.dir=")]
    sys.argv.append(f"hydra.run.dir='{text}'")


def _log_to_run_dir() -> None:
    """Every printed line and graphopt's log go to Hydra's log file (``cli.log``) only."""
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    logger = logging.getLogger("graphopt")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    for h in list(logger.handlers):  # a sweep's previous job wrote to its own directory
        if isinstance(h, logging.FileHandler) and h not in files:
            logger.removeHandler(h)
    for h in files:
        if h not in logger.handlers:
            logger.addHandler(h)
    console = logging.getLogger("graphopt.console")
    if not isinstance(sys.stdout, _Stream) or sys.stdout._logger is None:
        sys.stdout = _Stream(sys.stdout, console, logging.INFO)
    if not isinstance(sys.stderr, _Stream) or sys.stderr._logger is None:
        sys.stderr = _Stream(sys.stderr, console, logging.ERROR)


def _written_by_this_run(run_dir: Path, pattern: str = "*") -> list[Path]:
    """Paths under `run_dir` this process wrote (modified since it started). A run directory
    may be a user's own folder (``hydra.run.dir=.``): nothing older is ever touched."""
    out = []
    for path in run_dir.rglob(pattern):
        with contextlib.suppress(OSError):
            if path.lstat().st_mtime >= _STARTED:
                out.append(path)
    return out


def _finish(run_dir: Path, code: int) -> None:
    """The last line (where, how long), consistent modes (0644) and no lock left behind."""
    if code in (0, 1) and (run_dir / "report.json").exists():
        print(f"graphopt: run directory {run_dir} (total {progress.current().elapsed():.1f} s)")
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    for path in _written_by_this_run(run_dir):
        with contextlib.suppress(OSError):
            if path.is_file():
                path.chmod(0o644)
            elif path.is_dir():
                path.chmod(0o755)
    lock = _STATE.get("lock")
    if lock is not None and Path(lock.path).parent == run_dir:
        lock.release()


#: (job directory, exit code) of every failed job of a sweep
_FAILED_JOBS: list[tuple[str, int]] = []


@hydra.main(version_base="1.3", config_path="pkg://graphopt.conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    _log_to_run_dir()
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    code = 1
    try:
        if (hc.mode == RunMode.MULTIRUN and not cfg.overwrite
                and (run_dir / "report.json").exists()):
            # a sweep's job directories are not checked up front: refuse here, per job
            code, message = 2, (f"graphopt: error: run directory {run_dir}: already holds a "
                                "finished run (report.json); set overwrite=true to replace it")
            print(message, file=sys.stderr)
        else:
            if hc.mode == RunMode.MULTIRUN and cfg.overwrite:
                clear_outputs(run_dir)  # a re-run job keeps nothing of its last run
            code, message = run(cfg)
    finally:
        _finish(run_dir, code)
    if not code:
        return
    if hc.mode != RunMode.MULTIRUN:
        sys.exit(code)
    # In a sweep one failed job must not stop the others: note it; SweepFailures fails the
    # sweep at the end (from the launching process, whichever launcher ran the job).
    write_atomic(Path(hc.runtime.output_dir) / "error.txt", message + "\n")
    write_atomic(Path(hc.runtime.output_dir) / EXIT_CODE_FILE, f"{code}\n")


#: a failed sweep job's exit code, next to its error.txt
EXIT_CODE_FILE = ".exit_code"


class SweepFailures(Callback):
    """Hydra callback: after a sweep, the jobs that failed, read from their directories.

    Runs in the launching process, so it sees jobs a parallel launcher (joblib, submitit) ran in
    other processes too.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        for error in sorted(Path(config.hydra.sweep.dir).glob("*/error.txt")):
            code_file = error.with_name(EXIT_CODE_FILE)
            code = int(code_file.read_text()) if code_file.is_file() else 1
            _FAILED_JOBS.append((str(error.parent), code))


def main() -> None:
    """Console-script entry point (``graphopt``; ``tools/optimize.py`` calls it too)."""
    # Paddle warns while it runs (PIR place interface, unbound locals in converted code): noise,
    # not the user's problem. (Its import-time chatter is silenced in graphopt/__init__.py.)
    warnings.filterwarnings("ignore", category=UserWarning)
    # A model config's `_target_` names the user's own module: import it from where the user
    # runs the command, as `python -m` would.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    install_signal_handlers()
    safe = _Stream(sys.stdout)
    sys.stdout = safe  # type: ignore[assignment]
    progress.enable(file=safe)
    # HYDRA_FULL_ERROR=1: config errors are left to Hydra (full tracebacks); the run directory
    # is still checked and claimed, since a second run must never overwrite a finished one.
    full = os.environ.get("HYDRA_FULL_ERROR") == "1"
    if _flags(sys.argv[1:]).get("list_passes") and not _hydra_mode(sys.argv[1:]):
        # nothing runs: no run directory is made (nor a finished one touched)
        try:
            check_config(sys.argv[1:])
        except ConfigError as e:
            print(f"graphopt: error: {e}", file=sys.stderr)
            sys.exit(2)
        print(describe_passes())
        return
    try:
        run_dir = check_argv(sys.argv[1:], config=not full)
        if run_dir is not None:
            _claim(run_dir, _flags(sys.argv[1:]).get("overwrite", False))
            _pin_run_dir(run_dir)
    except (ConfigError, RunDirError) as e:
        print(f"graphopt: error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        _hydra_main()
    finally:
        if run_dir is not None:
            _drop_unused_run_dir(run_dir)
    if _FAILED_JOBS:
        print(f"graphopt: {len(_FAILED_JOBS)} sweep job(s) failed: "
              + ", ".join(d for d, _ in _FAILED_JOBS), file=sys.stderr)
        sys.exit(max(c for _, c in _FAILED_JOBS))
