"""Typed configuration: the schema of every config node, in Hydra's ConfigStore.

``conf/config.yaml`` extends :class:`GraphoptConfig`; each model family's yaml extends its
family's node schema (``conf/model/dsv3.yaml`` -> ``dsv3_schema``). OmegaConf checks types when
a config is composed; :func:`validate` then checks what types cannot say (ranges, the pipeline's
passes and options, the model's builder, the backend on this Paddle build), so every bad value
fails before any model is built, as one line naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paddle
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from graphopt.errors import ConfigError
from graphopt.models import builder_path, check_builder, check_model
from graphopt.models.deepseek_v3.config import DeepseekV3Node
from graphopt.models.tiny import TinyNode
from graphopt.passes.manager import PassManager
from graphopt.runtime.backend import check_backend
from graphopt.runtime.capture import DEFAULT_CAPTURE_SIZES, CaptureCheck


class Device(str, enum.Enum):
    """Where the model runs."""

    cpu = "cpu"
    gpu = "gpu"


class CheckAction(str, enum.Enum):
    """What a checked capture does with a graph whose replay differs from the uncaptured run."""

    drop = "drop"
    fail = "fail"


@dataclass
class RuntimeConfig:
    """``runtime``: how optimized steps run (execution backend, capture sizes, checks)."""

    #: a registered backend (graphopt.runtime.backend): emulator, none, cuda, torch_cpu,
    #: torch_cuda, or one a package adds through the graphopt.backends entry points
    backend: str = "emulator"
    #: where the model and its programs run (paddle.set_device before the model is built)
    device: Device = Device.cpu
    #: batch token counts that get a captured graph; a batch is padded up to the next size
    cudagraph_capture_sizes: list[int] = field(default_factory=lambda: [*DEFAULT_CAPTURE_SIZES])
    cudagraph_num_of_warmups: int = 1
    #: replay each newly captured graph once on its capture batch, compare it with the
    #: uncaptured run, and drop it (that graph's segment/variant and size run uncaptured) if it
    #: differs by more than check_captures_atol
    check_captures: bool = False
    check_captures_atol: float = 1e-4
    #: replays of each graph compared with an uncaptured run (the first ones; null: every
    #: replay). A graph goes stale on later replays, so more than the first is checked.
    check_captures_replays: int | None = 3
    #: a replay that differs: drop the graph (it runs uncaptured) or fail the run
    check_captures_on_mismatch: CheckAction = CheckAction.drop

    def __post_init__(self) -> None:
        if not self.check_captures_atol >= 0:
            raise ValueError("runtime.check_captures_atol must be >= 0, got "
                             f"{self.check_captures_atol}")
        if self.check_captures_replays is not None and self.check_captures_replays < 1:
            raise ValueError("runtime.check_captures_replays must be >= 1 (or null: every "
                             f"replay), got {self.check_captures_replays}")
        sizes = list(self.cudagraph_capture_sizes)
        if not sizes:
            raise ValueError("runtime.cudagraph_capture_sizes is empty: give at least one size, "
                             "e.g. [1,2,4,8]")
        if min(sizes) < 1:
            raise ValueError(f"runtime.cudagraph_capture_sizes={sizes}: sizes must be >= 1")
        if sizes != sorted(set(sizes)):
            raise ValueError(f"runtime.cudagraph_capture_sizes={sizes}: sizes must be strictly "
                             f"increasing, e.g. {sorted(set(sizes))}")
        if self.cudagraph_num_of_warmups < 0:
            raise ValueError("runtime.cudagraph_num_of_warmups must be >= 0, got "
                             f"{self.cudagraph_num_of_warmups}")


@dataclass
class VerifyConfig:
    """``verify``: how the optimized step is checked against the eager model."""

    #: random prefill/decode/mixed steps replayed after optimizing
    steps: int = 20
    seed: int = 0
    #: max abs error allowed against eager (fp32), same batch shape
    atol: float = 1e-5
    #: replayed steps are padded to a capture size, which changes fp32 summation order
    replay_atol: float = 1e-4
    #: exit 1 when the optimized step differs from eager
    fail_on_mismatch: bool = True
    #: on a mismatch, rerun with a numeric check after each program pass and name the first
    #: pass that broke the step (IR before/after in <run_dir>/bisect/)
    bisect: bool = False
    #: with a segment plan (what runs), also run the unsplit program against eager when it has
    #: at most this many ops; compiling one block of 14k ops costs tens of seconds and ~1 GB
    whole_program_max_ops: int = 4000

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"verify.steps must be >= 0, got {self.steps}")
        if self.seed < 0:  # numpy's generators take non-negative seeds only
            raise ValueError(f"verify.seed must be >= 0, got {self.seed}")
        if self.whole_program_max_ops < 0:
            raise ValueError("verify.whole_program_max_ops must be >= 0, got "
                             f"{self.whole_program_max_ops}")
        for key in ("atol", "replay_atol"):
            if not getattr(self, key) > 0:
                raise ValueError(f"verify.{key} must be > 0, got {getattr(self, key)}")


@dataclass
class PipelineConfig:
    """``pipeline``: an ordered list of pass names and their options, keyed by pass name."""

    name: str = "custom"
    passes: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class CacheConfig:
    """``cache``: the compile cache (optimized programs saved under a key, loaded back)."""

    #: look the run up in the cache; on a hit skip trace and passes (verification still runs)
    enabled: bool = False
    #: where entries live (one directory per key); shared safely by concurrent jobs
    dir: str = "~/.cache/graphopt"
    #: on a hit, replay the verify.steps steps again even when the run that made the entry
    #: recorded that check's result for the same settings (false: show the recorded result;
    #: the numerics check against eager always runs)
    replay_on_hit: bool = False


@dataclass
class GraphoptConfig:
    """The top-level config of one optimize run."""

    model: Any = MISSING
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    #: true: the whole step must be one CUDA graph; false: capture piecewise around control flow
    full_cuda_graph: bool = False
    #: write ir/NNN_<pass>.txt after each pass
    dump_ir: bool = False
    #: a pass that changed nothing writes only its header
    dump_ir_only_on_change: bool = True
    #: structural check of the program after every pass
    verify_each: bool = True
    #: print every registered pass with its options, then exit
    list_passes: bool = False
    #: run into a run directory that already holds a finished run's report.json (replacing it)
    overwrite: bool = False


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore (idempotent; before any compose)."""
    cs = ConfigStore.instance()
    cs.store(name="graphopt_schema", node=GraphoptConfig)
    cs.store(group="model", name="dsv3_schema", node=DeepseekV3Node)
    cs.store(group="model", name="tiny_schema", node=TinyNode)


#: ConfigStore entries that are schemas, not choices (kept out of "choose one of" lists)
SCHEMA_SUFFIX = "_schema"


def typed(cfg: DictConfig) -> GraphoptConfig:
    """The config as dataclasses, running every ``__post_init__`` range check (one line)."""
    try:
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        msg = (getattr(e, "msg", None) or str(e)).strip().splitlines()[0]
        raise ConfigError(f"{e.full_key}: {msg}" if e.full_key else msg) from None
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None


def _unknown_keys(node: DictConfig, prefix: str = "") -> None:
    """``+key=value`` adds keys even to typed nodes; a key its schema lacks is a typo."""
    schema = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(schema):
        valid = [f.name for f in dataclasses.fields(schema)]
        for key in node:
            if key not in valid:
                close = difflib.get_close_matches(str(key), valid, n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise ConfigError(f"{prefix}{key}: not a key of {schema.__name__}.{hint} "
                                  f"Valid keys: {', '.join(k for k in valid if k != '_target_')}")
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            _unknown_keys(child, f"{prefix}{key}.")


def validate(cfg: DictConfig) -> PassManager:
    """Check everything that can be checked without building the model; return the pipeline.

    Raises a one-line :class:`ConfigError` naming the key at fault.
    """
    _unknown_keys(cfg)
    typed(cfg)
    check_builder(cfg.model)
    check_model(cfg.model)
    check_capture_sizes(cfg)
    if cfg.cache.enabled:
        check_cache_dir(str(cfg.cache.dir))
    if cfg.runtime.device == Device.cpu.value:
        # on a GPU the parameters live in device memory, which this check does not read
        check_memory(cfg.model)
    check_backend(str(cfg.runtime.backend))
    if cfg.runtime.device == Device.gpu.value and not paddle.is_compiled_with_cuda():
        raise ConfigError("runtime.device=gpu needs a CUDA build of Paddle (paddlepaddle-gpu "
                          "3.3); this Paddle is CPU-only: use runtime=cpu, or runtime=torch_cuda "
                          "(Paddle plans on the CPU, PyTorch runs the plan on the GPU)")
    if cfg.runtime.backend == "cuda" and cfg.runtime.device != Device.gpu.value:
        raise ConfigError("runtime.backend=cuda captures CUDA graphs of a model on the GPU: set "
                          "runtime.device=gpu too (runtime=gpu sets both)")
    return PassManager.from_config(list(cfg.pipeline.passes), cfg.pipeline.options,
                                   verify_each=cfg.verify_each)


def check_cache_dir(directory: str) -> None:
    """``cache.dir`` must be a directory this process can write (made if missing): a file, or a
    directory on a read-only mount, would otherwise fail only after the trace."""
    path = Path(os.path.expanduser(directory))
    if path.exists() and not path.is_dir():
        raise ConfigError(f"cache.dir={directory}: is a file, not a directory; give a "
                          "directory (made if missing), or cache.enabled=false")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"cache.dir={directory}: {existing} is a file, so the directory "
                          "cannot be made; give another path, or cache.enabled=false")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"cache.dir={directory}: {existing} is not writable (a read-only "
                          "mount, or its permissions); give a writable directory, or "
                          "cache.enabled=false")


def max_tokens(model: Any) -> int | None:
    """Most tokens one step of the model can hold: ``max_num_seqs * max_seq_len`` (every
    sequence filling its cache rows); None when the model node has no such keys."""
    seqs, length = model.get("max_num_seqs"), model.get("max_seq_len")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (seqs, length)):
        return None
    return int(seqs) * int(length)


def check_capture_sizes(cfg: DictConfig) -> None:
    """A capture size above the model's :func:`max_tokens` is never used by any batch, and
    capturing it costs memory in proportion: refuse it, naming the limit and how to raise it."""
    limit = max_tokens(cfg.model)
    sizes = [int(s) for s in cfg.runtime.cudagraph_capture_sizes]
    if limit is None or not sizes or sizes[-1] <= limit:
        return
    bad = next(s for s in sizes if s > limit)
    fits = [s for s in sizes if s <= limit] or [limit]
    raise ConfigError(
        f"runtime.cudagraph_capture_sizes: size {bad} is above the model's maximum of {limit} "
        f"tokens a step (model.max_num_seqs={cfg.model.max_num_seqs} x "
        f"model.max_seq_len={cfg.model.max_seq_len}): use sizes <= {limit}, e.g. "
        f"runtime.cudagraph_capture_sizes=[{','.join(map(str, fits))}], or raise "
        "model.max_num_seqs / model.max_seq_len")


def available_memory() -> int | None:
    """Bytes of memory this machine can give a new process now: /proc/meminfo's MemAvailable
    (page cache it can drop included), else free physical pages; None if neither is known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def check_memory(model: Any) -> None:
    """Refuse a model whose parameters and caches alone (its family's ``estimate_memory(**keys)``,
    counted from the config: see :class:`graphopt.models.base.MemoryEstimate`) exceed the
    memory this machine has available, before it is built."""
    module_name = builder_path(model).rsplit(".", 1)[0]
    estimate_memory = getattr(importlib.import_module(module_name), "estimate_memory", None)
    if not callable(estimate_memory):
        return  # a family of the user's own that gives no estimate
    keys = OmegaConf.to_container(model, resolve=True) if isinstance(model, DictConfig) \
        else dict(model)
    est = estimate_memory(**{k: v for k, v in keys.items() if k not in ("_target_", "family")})
    available = available_memory()
    if available is None or est.total <= available:
        return
    reduce = ", ".join(f"model.{k} (now {v})" for k, v in est.reduce.items())
    raise ConfigError(
        f"model: needs at least {_gib(est.total)} of memory (parameters {_gib(est.parameters)} "
        f"+ KV caches {_gib(est.caches)}, float32, counted from the config) but this machine "
        f"has {_gib(available)} available: reduce {reduce}")


def config_warnings(cfg: DictConfig) -> list[str]:
    """Settings that are valid but do nothing as given, one line each (shown, not refused):
    the cache's keys while the cache is off (``cache.dir`` compared with its default, since a
    composed config does not say who set it)."""
    out = []
    if not cfg.cache.enabled:
        ignored = []
        if str(cfg.cache.dir) != CacheConfig.dir:
            ignored.append(f"cache.dir={cfg.cache.dir}")
        if cfg.cache.replay_on_hit:
            ignored.append("cache.replay_on_hit=true")
        if ignored:
            out.append(f"{' and '.join(ignored)} ignored: the compile cache is off; add "
                       "cache.enabled=true to use it")
    return out


def capture_check(runtime: Any) -> CaptureCheck | None:
    """The checked-capture policy of a ``runtime`` node (None: ``check_captures=false``)."""
    if not runtime.check_captures:
        return None
    replays = runtime.check_captures_replays
    return CaptureCheck(atol=float(runtime.check_captures_atol),
                        replays=None if replays is None else int(replays),
                        on_mismatch=str(getattr(runtime.check_captures_on_mismatch, "value",
                                                runtime.check_captures_on_mismatch)))
