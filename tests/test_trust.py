"""Trust boundaries: a run directory or a cache entry is data. Crafted entries (a foreign
``_target_``, a builder that writes a file, a material/key mismatch, a swapped program, a
tampered replay record, a forbidden op, a foreign flag) are refused or rebuilt with one line,
and nothing in them runs: each test checks that the file the entry aims at was not touched."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from graphopt import cache as cache_mod
from graphopt.cache import CacheError, UntrustedEntryError, cache_key
from graphopt.driver import optimize
from graphopt.errors import ConfigError
from graphopt.serving import load
from tests.conftest import compose_cfg

#: set by the builder below when (and only when) it runs
MARKER = "graphopt-trust-marker"


def writes_a_file(path: str, **_: object) -> str:
    """A model builder as an attacker would plant it: touches a file, returns no model."""
    Path(path).write_text("ran")
    return "not a bundle"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """One cached run of the tiny model: its run directory and its cache directory."""
    root = tmp_path_factory.mktemp("trust")
    cfg = compose_cfg("model=tiny", "cache.enabled=true", f"cache.dir={root / 'cache'}",
                      "verify.steps=3")
    report = optimize(cfg, run_dir=root / "run")
    assert report["verified"]
    return root, report["cache"]["key"]


def _copy_entry(made, tmp_path) -> Path:
    root, _ = made
    entry = tmp_path / "entry"
    shutil.copytree(root / "run" / "compiled", entry)
    return entry


def _edit(entry: Path, rekey: bool, change) -> dict:
    """Edit entry.json; with `rekey`, as a careful attacker would, make the key the hash of
    the new material (so only the trust rules can stop it)."""
    meta = json.loads((entry / "entry.json").read_text())
    change(meta)
    if rekey:
        meta["key"] = cache_key(meta["material"])
    (entry / "entry.json").write_text(json.dumps(meta))
    return meta


def _one_line(e: Exception) -> str:
    msg = str(e)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("where", ["builder", "nested"])
def test_a_foreign_target_is_refused_and_nothing_runs(made, tmp_path, where):
    entry = _copy_entry(made, tmp_path)
    src, dst = tmp_path / "src.txt", tmp_path / "copied.txt"
    src.write_text("secret")
    aim = {"_target_": "shutil.copyfile", "src": str(src), "dst": str(dst)}

    def plant(meta):
        if where == "builder":
            meta["material"]["model"] = aim
        else:  # a trusted family, with a nested target Hydra would instantiate
            meta["material"]["model"]["extra"] = {"deeper": aim}

    _edit(entry, rekey=True, change=plant)
    with pytest.raises(UntrustedEntryError) as info:
        load(entry, backend="none")
    msg = _one_line(info.value)
    assert "would run 'shutil.copyfile'" in msg and "nothing was run" in msg
    assert "trust_remote_code=True" in msg
    assert not dst.exists()


def test_a_builder_that_writes_a_file_runs_only_when_named_or_trusted(made, tmp_path):
    entry = _copy_entry(made, tmp_path)
    marker = tmp_path / MARKER
    target = f"{__name__}.writes_a_file"
    _edit(entry, rekey=True, change=lambda m: m["material"].__setitem__(
        "model", {"_target_": target, "path": str(marker)}))
    with pytest.raises(UntrustedEntryError, match=f"would run '{target}'"):
        load(entry, backend="none")
    assert not marker.exists()
    # the caller vouches for it: now it runs (and fails: it returns no model)
    with pytest.raises(ConfigError, match=r"expected a graphopt\.models\.ModelBundle"):
        load(entry, backend="none", builder=target)
    assert marker.read_text() == "ran"


def test_material_that_is_not_the_key_is_refused_before_building(made, tmp_path):
    entry = _copy_entry(made, tmp_path)
    marker = tmp_path / MARKER
    # no rekey: the key still names the original material
    _edit(entry, rekey=False, change=lambda m: m["material"].__setitem__(
        "model", {"_target_": f"{__name__}.writes_a_file", "path": str(marker)}))
    with pytest.raises(CacheError) as info:
        load(entry, backend="none", trust_remote_code=True)  # integrity comes first
    assert "is not the hash of its material" in _one_line(info.value)
    assert not marker.exists()


def test_a_swapped_program_file_is_refused(made, tmp_path):
    entry = _copy_entry(made, tmp_path)
    program = entry / "program.pir"
    program.write_bytes(program.read_bytes()[::-1])
    with pytest.raises(CacheError) as info:
        load(entry, backend="none")
    assert "does not match its checksum" in _one_line(info.value)


def test_a_file_name_outside_the_entry_is_refused(made, tmp_path):
    entry = _copy_entry(made, tmp_path)
    outside = tmp_path / "elsewhere.pir"
    shutil.copy(entry / "program.pir", outside)

    def point_out(meta):
        meta["files"]["program"] = "../elsewhere.pir"

    _edit(entry, rekey=False, change=point_out)
    with pytest.raises(CacheError, match="names a file outside the entry"):
        load(entry, backend="none")


def test_a_foreign_paddle_flag_is_refused(made, tmp_path):
    entry = _copy_entry(made, tmp_path)
    _edit(entry, rekey=False, change=lambda m: m["flags"].__setitem__(
        "FLAGS_allocator_strategy", "naive_best_fit"))
    with pytest.raises(CacheError) as info:
        load(entry, backend="none")
    assert "sets Paddle flag FLAGS_allocator_strategy" in _one_line(info.value)


def test_a_program_holding_a_forbidden_op_is_refused(made, tmp_path, monkeypatch):
    """Programs graphopt makes never read or write files. Paddle's Python API cannot build a
    save op into a program here, so the check is shown firing on an op the program has."""
    entry = _copy_entry(made, tmp_path)
    monkeypatch.setattr(cache_mod, "FORBIDDEN_OPS", frozenset({"pd_op.matmul"}))
    with pytest.raises(CacheError) as info:
        load(entry, backend="none")
    assert "its program holds pd_op.matmul" in _one_line(info.value)


def test_a_replay_record_counts_only_for_the_files_it_checked(made, tmp_path):
    """A hit shows the recorded replay of its entry; the same record next to other files (a
    copied record, an entry whose files were swapped consistently) is ignored: the replay
    runs again."""
    root, key = made
    cache_dir = tmp_path / "cache"
    shutil.copytree(root / "cache", cache_dir)
    entry = cache_dir / key
    records = list(entry.glob("replay-*.json"))
    assert records  # the cold run recorded its replay
    cfg = ("model=tiny", "cache.enabled=true", f"cache.dir={cache_dir}", "verify.steps=3")
    hit = optimize(compose_cfg(*cfg), run_dir=tmp_path / "hit")
    assert hit["cache"]["status"] == "hit" and hit["replay"].get("recorded")
    # bind the record to other contents: as if copied from another entry
    data = json.loads(records[0].read_text())
    data["entry"]["sha256"]["program"] = "0" * 64
    records[0].write_text(json.dumps(data))
    again = optimize(compose_cfg(*cfg), run_dir=tmp_path / "again")
    assert again["cache"]["status"] == "hit" and not again["replay"].get("recorded")
    assert again["replay"]["steps"] == 3 and again["verified"]


def test_a_tampered_cache_entry_is_rebuilt_with_one_line(made, tmp_path, capsys):
    root, key = made
    cache_dir = tmp_path / "cache"
    shutil.copytree(root / "cache", cache_dir)
    marker = tmp_path / MARKER
    _edit(cache_dir / key, rekey=False, change=lambda m: m["material"].__setitem__(
        "model", {"_target_": f"{__name__}.writes_a_file", "path": str(marker)}))
    capsys.readouterr()
    cfg = compose_cfg("model=tiny", "cache.enabled=true", f"cache.dir={cache_dir}",
                      "verify.steps=3")
    report = optimize(cfg, run_dir=tmp_path / "run")
    err = capsys.readouterr().err
    assert report["cache"]["status"] == "rebuilt" and report["verified"]
    lines = [ln for ln in err.splitlines() if "cache entry" in ln]
    assert len(lines) == 1 and "is not the hash of its material" in lines[0]
    assert not marker.exists()


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX permissions")
def test_a_cache_dir_others_can_write_gets_one_warning(made, tmp_path, capsys):
    cache_dir = tmp_path / "shared"
    cache_dir.mkdir()
    cfg = compose_cfg("model=tiny", "cache.enabled=true", f"cache.dir={cache_dir}",
                      "verify.steps=2")
    os.chmod(cache_dir, 0o777)
    capsys.readouterr()
    optimize(cfg, run_dir=tmp_path / "open")
    warned = [ln for ln in capsys.readouterr().err.splitlines() if "plant entries" in ln]
    assert len(warned) == 1 and "lets other users write into it" in warned[0]
    os.chmod(cache_dir, 0o1777)  # /tmp-style: writable, but only owners may replace entries
    optimize(cfg, run_dir=tmp_path / "sticky")
    assert "plant entries" not in capsys.readouterr().err


def test_new_entries_follow_the_users_umask(made, tmp_path):
    cache_dir = tmp_path / "private"
    old = os.umask(0o077)
    try:
        optimize(compose_cfg("model=tiny", "cache.enabled=true", f"cache.dir={cache_dir}",
                             "verify.steps=2"), run_dir=tmp_path / "run")
    finally:
        os.umask(old)
    (entry,) = [p for p in cache_dir.iterdir() if not p.name.startswith(".")]
    assert entry.stat().st_mode & 0o077 == 0
    assert all(f.stat().st_mode & 0o077 == 0 for f in entry.iterdir())
