"""The compile cache: an optimized step saved under a key, loaded back without tracing.

An entry is a directory::

    entry.json      what the key was made of, the ModelProgram's metadata (host inputs, prologue
                    outputs, blacklist, flags, marked functions, the traces and pass records of
                    the run that made it), how each weight binds to the model, file checksums
    program.pir     the optimized program (Paddle's own serialisation)
    prologue.pir    the host prologue, when there is one
    consts.npz      program inputs that are model buffers, and any weight not found in the model

Weights are not copied: each parameter of the program is bound by its structured name in the
model (``layers.3.mlp.gate.weight``), and the key holds the weights' hash, so a model built from
the same config has the same values. The segment plan is rebuilt by piecewise-split on the loaded
program (its programs are cheap to cut again, and a plan is only as good as its program).

A cache directory holds one entry per key, ``<dir>/<key>/``. Writers build an entry in a private
temporary directory and rename it into place (atomic on one filesystem), so concurrent jobs of a
sweep never see a half-written entry; when two write one key, the first rename wins. A corrupt or
stale entry is detected on load (checksums, versions, key) and rebuilt.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paddle
from paddle.base import core

import graphopt
from graphopt.errors import GraphoptError
from graphopt.ir.model_program import (
    BranchCondition,
    GraphBreak,
    HostPrologue,
    MarkedFunction,
    ModelProgram,
    Specialization,
    TraceInfo,
    Variant,
)
from graphopt.ir.pir_utils import walk_ops
from graphopt.models.base import ModelBundle
from graphopt.passes.piecewise_split import plan_model_program

#: bumped when the entry layout changes (older entries are then stale)
ENTRY_FORMAT = 2
ENTRY_FILE = "entry.json"


#: the Paddle flags an entry may set when it is loaded: those graphopt's passes record. Any
#: other flag in an entry is refused (a flag changes how Paddle runs everything after it).
ENTRY_FLAGS = frozenset({"FLAGS_cuda_graph_blacklist"})
#: ops that read or write files or call back into Python: graphopt never makes them, and a
#: loaded program holding one is refused before it runs
FORBIDDEN_OPS = frozenset({"pd_op.save", "pd_op.save_combine", "pd_op.load",
                           "pd_op.load_combine", "pd_op.py_func"})


class CacheError(GraphoptError):
    """A cache entry cannot be used (missing, corrupt or stale); the message says why."""


class UntrustedEntryError(CacheError):
    """An entry would run code nobody vouched for (``load(..., trust_remote_code=True)``)."""


def key_material(model_cfg: dict[str, Any], provenance: dict[str, Any],
                 pipeline: list[dict[str, Any]], options: dict[str, Any],
                 code: dict[str, str] | None = None) -> dict[str, Any]:
    """Everything an optimized step depends on: the model's config, its weights' hash, the
    pipeline with every option, the run's other options, graphopt's and Paddle's versions, and
    `code`: digests of the sources outside graphopt the step comes from (plug-in passes, the
    model's builder and Layer classes; see :func:`code_digests`)."""
    return {
        "code": dict(sorted((code or {}).items())),
        "format": ENTRY_FORMAT,
        "model": model_cfg,
        "weights": _without_paths(provenance),
        "pipeline": pipeline,
        "options": options,
        "graphopt": graphopt.__version__,
        # an edited pass must not be served from an entry the old code made
        "graphopt_source": source_digest(),
        "paddle": paddle.__version__,
        "paddle_commit": getattr(paddle.version, "commit", ""),
    }


@functools.cache
def source_digest() -> str:
    """sha256 over graphopt's own Python sources (names and contents)."""
    root = Path(graphopt.__file__).parent
    digest = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        digest.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()[:16]


def code_digests(objects: Iterable[Any]) -> dict[str, str]:
    """sha256 (16 hex digits) of the source file of each object's module, by module name, for
    the modules that are neither graphopt's own (:func:`source_digest` covers those) nor
    Paddle's (its version is in the key): so an edited plug-in pass, model builder or model
    Layer misses the cache. An object whose module has no source file is skipped."""
    root = Path(graphopt.__file__).parent
    out: dict[str, str] = {}
    for obj in objects:
        module = sys.modules.get(getattr(obj, "__module__", None) or "")
        if module is None or module.__name__.split(".")[0] in ("graphopt", "paddle"):
            continue
        path = getattr(module, "__file__", None)
        if not path or not Path(path).is_file() or Path(path).is_relative_to(root):
            continue
        out[module.__name__] = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    return out


def cache_key(material: dict[str, Any]) -> str:
    """The key of an entry: a hash of its :func:`key_material`."""
    text = json.dumps(material, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _without_paths(value: Any) -> Any:
    """Provenance without the weights' file path: their sha256 already names them. (The model
    config's own `weights` / `config_json` keys are part of the key as written.)"""
    if isinstance(value, dict):
        return {k: _without_paths(v) for k, v in value.items() if k != "path"}
    return value


@dataclass
class Entry:
    """A loaded entry: the ModelProgram (plan rebuilt) and what the run that made it recorded."""

    key: str
    mp: ModelProgram
    records: list[dict[str, Any]] = field(default_factory=list)
    hazards_before: list[dict] | None = None
    created: str = ""
    material: dict[str, Any] = field(default_factory=dict)


# -- writing ------------------------------------------------------------------------------------
def write_entry(path: Path, key: str, material: dict[str, Any], mp: ModelProgram,
                records: list[dict[str, Any]], hazards_before: list[dict] | None) -> None:
    """Write the entry of `mp` into the directory `path` (created; expected empty)."""
    if mp.program is None:
        raise CacheError("nothing to cache: the step is several SOT graphs, not one program")
    path.mkdir(parents=True, exist_ok=True)
    files = {"program": "program.pir"}
    core.serialize_pir_program(mp.program, str(path / "program.pir"), True, True, False)
    if mp.prologue is not None:
        core.serialize_pir_program(mp.prologue.program, str(path / "prologue.pir"), True, True,
                                   False)
        files["prologue"] = "prologue.pir"
    for i, v in enumerate(mp.variants):
        files[f"variant.{i}"] = f"variant.{i}.pir"
        core.serialize_pir_program(v.program, str(path / files[f"variant.{i}"]), True, True,
                                   False)
    bound, by_value = _bind_names(mp)
    if by_value:
        np.savez(path / "consts.npz", **{n: _numpy(mp.params[n]) for n in by_value})
        files["consts"] = "consts.npz"
    plan = mp.segments.options if mp.segments is not None else None
    meta = {
        "format": ENTRY_FORMAT,
        "key": key,
        "material": material,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "graphopt": graphopt.__version__,
        "paddle": paddle.__version__,
        "files": files,
        "sha256": {name: _sha256(path / f) for name, f in files.items()},
        "params_bound": bound,
        "params_by_value": by_value,
        "host_inputs": list(mp.host_inputs),
        "prologue_outputs": list(mp.prologue.outputs) if mp.prologue is not None else None,
        "blacklist": list(mp.blacklist),
        "flags": dict(mp.flags),
        "full_cuda_graph": mp.full_cuda_graph,
        "properties": sorted(mp.properties),
        "marked": [m.to_dict() for m in mp.marked],
        "traces": [t.to_dict() | {"_breaks": [vars(b) for b in t.graph_breaks]}
                   for t in mp.traces],
        "plan_options": plan,
        "variants": [{"name": v.name, "conditions": v.conditions, "label": v.label,
                      "kinds": v.kinds, "combinations": v.combinations} for v in mp.variants],
        "specialization": _specialization_to_json(mp.specialization),
        "records": records,
        "hazards_before": hazards_before,
    }
    (path / ENTRY_FILE).write_text(json.dumps(meta, indent=1, default=str) + "\n")


def _bind_names(mp: ModelProgram) -> tuple[dict[str, str], list[str]]:
    """Program parameter name -> structured name in the model, for every weight that IS a model
    parameter or buffer (same memory); the names of the rest (saved by value)."""
    owners: dict[tuple, str] = {}
    layer = mp.model.layer
    for name, t in [*layer.named_parameters(), *layer.named_buffers()]:
        with contextlib.suppress(Exception):
            owners.setdefault(_identity(t), name)
    bound, by_value = {}, []
    for pname, value in mp.params.items():
        structured = None
        # `const.<k>` feeds are often parameters too (SOT passes some weights as inputs)
        if isinstance(value, paddle.Tensor) and value.numel() > 0:
            structured = owners.get(_identity(value))
        if structured is None:
            by_value.append(pname)
        else:
            bound[pname] = structured
    return bound, by_value


def _identity(t: paddle.Tensor) -> tuple:
    """Same memory, shape and type: the same tensor (a view of a weight is not the weight)."""
    return (t.data_ptr(), tuple(t.shape), str(t.dtype))


def _numpy(value: Any) -> np.ndarray:
    return value.numpy() if isinstance(value, paddle.Tensor) else np.asarray(value)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# -- reading ------------------------------------------------------------------------------------
def read_meta(path: Path) -> dict[str, Any]:
    """The entry.json of the entry at `path` (CacheError if it is missing or unreadable)."""
    try:
        meta = json.loads((path / ENTRY_FILE).read_text())
    except FileNotFoundError:
        raise CacheError(f"no cache entry at {path}") from None
    except (OSError, ValueError) as e:
        raise CacheError(f"{path / ENTRY_FILE} is unreadable: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != ENTRY_FORMAT:
        raise CacheError(f"{path} has entry format {meta.get('format') if isinstance(meta, dict) else '?'}"
                         f", expected {ENTRY_FORMAT}")
    return meta


def verify_entry(path: Path, meta: dict[str, Any]) -> None:
    """The integrity checks every load and every cache hit makes before anything of the entry
    is used: its key is the hash of its material, every file matches its recorded sha256, and
    the Paddle flags it sets are ones graphopt records. CacheError (one line) otherwise."""
    material, key = meta.get("material"), meta.get("key")
    if not isinstance(material, dict) or cache_key(material) != key:
        raise CacheError(f"{path}: its key {key} is not the hash of its material (tampered "
                         "with or corrupt)")
    files, sums = meta.get("files"), meta.get("sha256")
    if not isinstance(files, dict) or not isinstance(sums, dict) or "program" not in files:
        raise CacheError(f"{path / ENTRY_FILE} is malformed (no files and checksums)")
    for name, file in files.items():
        f = path / str(file)
        if Path(str(file)).name != str(file):
            raise CacheError(f"{path / ENTRY_FILE} names a file outside the entry: {file!r}")
        if not f.is_file():
            raise CacheError(f"{f} is missing")
        if _sha256(f) != sums.get(name):
            raise CacheError(f"{f} does not match its checksum (corrupt)")
    flags = meta.get("flags")
    if not isinstance(flags, dict):
        raise CacheError(f"{path / ENTRY_FILE} is malformed (flags)")
    foreign = sorted(set(flags) - ENTRY_FLAGS)
    if foreign:
        raise CacheError(f"{path}: sets Paddle flag {foreign[0]}, which graphopt never records "
                         "(refused: flags change how Paddle runs everything after them)")


def _check_ops(path: Path, program: paddle.pir.Program, what: str) -> None:
    """Refuse a loaded program that holds an op graphopt never makes (file I/O, callbacks)."""
    for op in walk_ops(program.global_block()):
        if op.name() in FORBIDDEN_OPS:
            raise CacheError(f"{path}: its {what} holds {op.name()}, which reads or writes "
                             "files; graphopt never makes it (refused)")


def load_entry(path: Path, bundle: ModelBundle, expect_key: str | None = None) -> Entry:
    """Load the entry at `path` onto the model `bundle` (built from the same config).

    Raises :class:`CacheError` when the entry is corrupt (a file missing or changed) or stale
    (another key, graphopt or Paddle version, or weights the model does not have).
    """
    meta = read_meta(path)
    try:
        return _load_entry(path, meta, bundle, expect_key)
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # a valid JSON of wrong shape
        raise CacheError(f"{path / ENTRY_FILE} is malformed ({type(e).__name__}: {e})") from None


def _load_entry(path: Path, meta: dict[str, Any], bundle: ModelBundle,
                expect_key: str | None) -> Entry:
    if expect_key is not None and meta.get("key") != expect_key:
        raise CacheError(f"{path} holds key {meta.get('key')}, expected {expect_key}")
    verify_entry(path, meta)
    material = meta["material"]
    for what, now in (("graphopt", graphopt.__version__), ("paddle", paddle.__version__)):
        if meta.get(what) != now:
            raise CacheError(f"made by {what} {meta.get(what)}, this is {now} (stale)")
    if "weights" in material and material["weights"] != _without_paths(bundle.provenance):
        raise CacheError("made for other weights than the model's")
    files = meta["files"]
    try:
        program = _deserialize(path / files["program"])
        prologue = (HostPrologue(_deserialize(path / files["prologue"]),
                                 list(meta["prologue_outputs"]))
                    if "prologue" in files else None)
        params = _load_params(path, meta, bundle)
    except CacheError:
        raise
    except Exception as e:
        raise CacheError(f"{path}: cannot load: {type(e).__name__}: {e}") from None
    _check_ops(path, program, "program")
    if prologue is not None:
        _check_ops(path, prologue.program, "host prologue")

    mp = ModelProgram(model=bundle, program=program, params=params,
                      host_inputs=list(meta["host_inputs"]), prologue=prologue,
                      blacklist=list(meta["blacklist"]), flags=dict(meta["flags"]),
                      full_cuda_graph=bool(meta["full_cuda_graph"]))
    mp.properties = set(meta["properties"])
    mp.marked = [MarkedFunction(m["function"], m["location"], list(m["rewrites"]))
                 for m in meta["marked"]]
    mp.traces = [_trace_from_dict(t) for t in meta["traces"]]
    mp.trace = mp.traces[-1] if mp.traces else TraceInfo()
    try:
        mp.variants = [
            Variant(name=v["name"], conditions=dict(v["conditions"]),
                    program=_deserialize(path / files[f"variant.{i}"]), label=v["label"],
                    kinds=list(v["kinds"]), combinations=[dict(c) for c in v["combinations"]])
            for i, v in enumerate(meta.get("variants", []))]
        mp.specialization = _specialization_from_json(meta.get("specialization"))
    except Exception as e:
        raise CacheError(f"{path}: cannot load its variants: {type(e).__name__}: {e}") from None
    for v in mp.variants:
        _check_ops(path, v.program, f"variant {v.name}")
    if meta.get("plan_options") is not None:
        plan_model_program(mp, **meta["plan_options"])
    return Entry(key=meta["key"], mp=mp, records=list(meta["records"]),
                 hazards_before=meta["hazards_before"], created=meta["created"],
                 material=material)


def _specialization_to_json(spec: Specialization | None) -> dict[str, Any] | None:
    if spec is None:
        return None
    return {"conditions": [c.to_dict() for c in spec.conditions], "feasible": spec.feasible,
            "unreachable": spec.unreachable, "general": spec.general, "rule": spec.rule}


def _specialization_from_json(data: dict[str, Any] | None) -> Specialization | None:
    if data is None:
        return None
    return Specialization(
        conditions=[BranchCondition(c["name"], tuple(c["feeds"]), c["label"], c["location"])
                    for c in data["conditions"]],
        feasible=[dict(c) for c in data["feasible"]],
        unreachable=[dict(c) for c in data["unreachable"]],
        general=[dict(c) for c in data["general"]], rule=data["rule"])


def _deserialize(path: Path) -> paddle.pir.Program:
    program = paddle.pir.Program()
    core.deserialize_pir_program(str(path), program, -1)
    if not len(program.global_block().ops):
        raise CacheError(f"{path} holds an empty program")
    return program


def _load_params(path: Path, meta: dict[str, Any], bundle: ModelBundle
                 ) -> dict[str, paddle.Tensor]:
    layer = bundle.layer
    named = dict(layer.named_parameters())
    named.update(dict(layer.named_buffers()))
    params: dict[str, paddle.Tensor] = {}
    for pname, structured in meta["params_bound"].items():
        t = named.get(structured)
        if t is None:
            raise CacheError(f"the model has no weight {structured} (stale entry)")
        params[pname] = t.detach()
    if meta["params_by_value"]:
        with np.load(path / meta["files"]["consts"]) as data:
            for name in meta["params_by_value"]:
                params[name] = paddle.to_tensor(data[name], place=paddle.CPUPlace())
    return params


def _trace_from_dict(d: dict[str, Any]) -> TraceInfo:
    breaks = [GraphBreak(**b) for b in d.get("_breaks", [])]
    return TraceInfo(subgraphs=d["subgraphs"], graph_runs=d["graph_runs"], graph_breaks=breaks,
                     compile_count=d["compile_count"], ops=d["ops"], time_s=d["time_s"],
                     wall_s=d.get("wall_s", 0.0), marked=d["marked"],
                     placeholder_runs=d.get("placeholder_runs", 0),
                     retraced=d.get("retraced", False),
                     host_bound_by_reference=list(d["host_bound_by_reference"]),
                     frozen_inputs=list(d.get("frozen_inputs", [])),
                     inferred_host_inputs=list(d.get("inferred_host_inputs", [])))


def link_entry(src: Path, dst: Path) -> None:
    """Make `dst` a copy of the entry at `src` (hard links when the filesystem allows)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        target = dst / f.name
        target.unlink(missing_ok=True)
        try:
            os.link(f, target)
        except OSError:
            shutil.copy2(f, target)


# -- replay verdicts -----------------------------------------------------------------------------
def _replay_file(entry: Path, settings: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    return entry / f"replay-{digest.hexdigest()[:12]}.json"


def _binding(entry: Path) -> dict[str, Any] | None:
    """What a replay record is bound to: the entry's key and its files' checksums."""
    try:
        meta = json.loads((entry / ENTRY_FILE).read_text())
        return {"key": meta["key"], "sha256": meta["sha256"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def record_replay(entry: Path, settings: dict[str, Any], replay: dict[str, Any],
                  made_by: str) -> None:
    """Keep the replay check's result next to the entry, one file per replay `settings`.

    The replay check is a pure function of the entry (program, plan, weights; the trace seed
    is in the key), the runtime code (its digest is in the key) and `settings` (backend, device,
    steps, capture sizes, warm-ups, tolerances), so a hit with the same settings can show this
    result instead of computing it again. Written atomically; a read-only cache keeps none.
    """
    text = json.dumps({"settings": settings, "replay": replay, "made_by": made_by,
                       "entry": _binding(entry)}, default=str)
    with contextlib.suppress(OSError):
        fd, tmp = tempfile.mkstemp(dir=entry, prefix=".replay-")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, _replay_file(entry, settings))


def recorded_replay(entry: Path, settings: dict[str, Any]) -> tuple[dict[str, Any], str] | None:
    """The replay result :func:`record_replay` kept for exactly these `settings`, and which run
    made it; None when there is none, it is unreadable, it found a mismatch (a failing check
    is always run again, so its report is this run's), or it was made for other contents
    than the entry holds now (a record is trusted only with the files it checked; call it on
    an entry that passed :func:`verify_entry`)."""
    try:
        data = json.loads(_replay_file(entry, settings).read_text())
        if data["settings"] != json.loads(json.dumps(settings, default=str)):
            return None
        binding = _binding(entry)
        if binding is None or data.get("entry") != binding:
            return None
        replay, made_by = dict(data["replay"]), str(data["made_by"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if replay.get("mismatches", 1) != 0 or replay.get("recorded"):
        return None
    return replay, made_by


# -- the cache directory ------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class CompileCache:
    """Entries under one directory, one per key; safe for concurrent writers."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(os.path.expanduser(str(directory)))

    def unsafe(self) -> str | None:
        """Why other users could plant entries here (None: they cannot, or it does not exist
        yet): the directory is writable by its group or everyone without the sticky bit, or
        another user owns it. As pip and ccache do, graphopt warns and goes on."""
        try:
            st = self.dir.stat()
        except OSError:
            return None
        if hasattr(os, "getuid") and st.st_uid != os.getuid():
            return f"it is owned by uid {st.st_uid}, not by you (uid {os.getuid()})"
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            return (f"its mode {stat.filemode(st.st_mode)} lets other users write into it "
                    "without the sticky bit")
        return None

    def path(self, key: str) -> Path:
        return self.dir / key

    def load(self, key: str, bundle: ModelBundle) -> Entry | None:
        """The entry of `key` (None when there is none). CacheError when it is unusable."""
        path = self.path(key)
        if not path.exists():
            return None
        return load_entry(path, bundle, expect_key=key)

    def store(self, key: str, material: dict[str, Any], mp: ModelProgram,
              records: list[dict[str, Any]], hazards_before: list[dict] | None,
              replace: bool = False) -> bool:
        """Write the entry of `key`; False when another writer got there first.

        With `replace`, an existing (corrupt or stale) entry is moved aside first.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=self.dir))
        try:
            write_entry(tmp, key, material, mp, records, hazards_before)
            # readable as the user's umask says (mkdtemp makes the directory 0700)
            mask = _umask()
            for f in tmp.iterdir():
                os.chmod(f, 0o666 & ~mask)
            os.chmod(tmp, 0o777 & ~mask)
            target = self.path(key)
            if replace and target.exists():
                trash = Path(tempfile.mkdtemp(prefix=f".old-{key}-", dir=self.dir))
                with contextlib.suppress(OSError):
                    os.replace(target, trash / "entry")
                shutil.rmtree(trash, ignore_errors=True)
            try:
                os.rename(tmp, target)  # atomic; fails if another writer made the entry
            except OSError:
                return False
            return True
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
