"""A cache that cannot lie (issue 14, scope 5): damaged, truncated, edited or foreign records are
detected and recomputed (or refused naming the file); a lock stops a second writer with other
settings; a dead writer's lock is taken over."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.torch import save_file

import netmend
import netmend.store as nc

RUN = dict(progress=False, device="cpu", chunk_size=16, k=5)


@pytest.fixture
def problem(cache_problem):
    return cache_problem


def _cached_run(tmp_path, problem):
    model, train, failures = problem
    plain = netmend.identify(model, train, failures, "linear", **RUN)
    first = netmend.identify(model, train, failures, "linear", cache_dir=tmp_path, **RUN)
    np.testing.assert_array_equal(first.scores, plain.scores)
    gc.collect()
    return plain


def _rerun(tmp_path, problem):
    model, train, failures = problem
    return netmend.identify(model, train, failures, "linear", cache_dir=tmp_path, **RUN)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # a bit of the last tensor's data
    path.write_bytes(bytes(data))


def _edit_metadata(path: Path) -> None:
    """Rewrite the record with its tensors unchanged and one metadata value edited, keeping
    the old checksum (what a hand edit or another tool would do)."""
    with safe_open(str(path), framework="pt") as f:
        header = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    meta = json.loads(header["netmend"])
    meta["per_failure"] = not meta.get("per_failure")
    header["netmend"] = json.dumps(meta)
    save_file(tensors, str(path), metadata=header)


@pytest.mark.parametrize("damage", [_truncate, _flip_last_byte, _edit_metadata])
def test_damaged_result_is_detected_and_recomputed(tmp_path, problem, damage, caplog):
    plain = _cached_run(tmp_path, problem)
    record = tmp_path / "result.call0.safetensors"
    assert record.exists()
    damage(record)
    with pytest.raises(nc.CacheRecordError, match=str(record)):
        nc.load_tensors(record)
    with pytest.warns(UserWarning, match=r"result\.call0\.safetensors.*recomputing") as said:
        again = _rerun(tmp_path, problem)
    # said once: the CLI printed it twice, as a warning and as a log line (outside-in trial)
    assert len([w for w in said if "recomputing" in str(w.message)]) == 1
    assert not [r for r in caplog.records if "damaged" in r.getMessage()]
    assert "call0" not in again.info["cache"]["results_reused"]
    np.testing.assert_array_equal(again.scores, plain.scores)
    nc.load_tensors(record)  # rewritten, valid again


@pytest.mark.parametrize("damage", [_truncate, _flip_last_byte])
def test_damaged_pass_checkpoint_is_recomputed(tmp_path, problem, damage):
    plain = _cached_run(tmp_path, problem)
    (tmp_path / "result.call0.safetensors").unlink()  # force the passes to be read back
    passes = sorted(tmp_path.glob("pass.*.safetensors"))
    assert passes
    damage(passes[-1])
    with pytest.warns(UserWarning, match=passes[-1].name.replace(".", r"\.")):
        again = _rerun(tmp_path, problem)
    np.testing.assert_array_equal(again.scores, plain.scores)


def test_undamaged_cache_is_reused_silently(tmp_path, problem):
    import warnings

    plain = _cached_run(tmp_path, problem)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = _rerun(tmp_path, problem)
    assert again.info["cache"]["results_reused"] == ["call0"]
    np.testing.assert_array_equal(again.scores, plain.scores)


def test_record_from_another_run_is_not_reused(tmp_path, problem):
    model, train, failures = problem
    a, b = tmp_path / "a", tmp_path / "b"
    netmend.identify(model, train, failures, "linear", cache_dir=a, l2=1.0, **RUN)
    netmend.identify(model, train, failures, "linear", cache_dir=b, l2=2.0, **RUN)
    gc.collect()
    (a / "result.call0.safetensors").write_bytes((b / "result.call0.safetensors").read_bytes())
    with pytest.raises(nc.CacheRecordError, match="other settings"):
        nc.load_tensors(
            a / "result.call0.safetensors",
            nc.settings_hash(json.loads((a / "settings.json").read_text())) + "/result.call0",
        )
    with pytest.warns(UserWarning, match="other settings"):
        got = netmend.identify(model, train, failures, "linear", cache_dir=a, l2=1.0, **RUN)
    ref = netmend.identify(model, train, failures, "linear", l2=1.0, **RUN)
    np.testing.assert_array_equal(got.scores, ref.scores)


def test_unreadable_file_names_the_file_and_the_fix(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(nc.CacheRecordError, match=r"x\.safetensors.*delete it"):
        nc.load_tensors(path)


# ----------------------------------------------------------------------------- the lock

_HOLDER = textwrap.dedent(
    """
    import sys
    import netmend.store as nc
    run = nc.RunCache(sys.argv[1], {"who": sys.argv[2]})
    print("ready", flush=True)
    sys.stdin.read()  # hold the lock until the parent closes stdin
    """
)


def _holder(path: Path, who: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(path), who],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def test_second_writer_with_other_settings_is_refused(tmp_path):
    proc = _holder(tmp_path, "first")
    try:
        with pytest.raises(ValueError, match=rf"in use by process {proc.pid}.*other settings"):
            nc.RunCache(tmp_path, {"who": "second"}, overwrite=True)
        nc.RunCache(tmp_path, {"who": "first"})  # same settings: may share
    finally:
        proc.stdin.close()  # type: ignore[union-attr]
        proc.wait(timeout=60)
    gc.collect()
    assert not (tmp_path / ".lock").exists()  # released on exit
    nc.RunCache(tmp_path, {"who": "second"}, overwrite=True)  # free now


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=60)
    lock = tmp_path / ".lock"
    lock.write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename, "settings": "x"}))
    run = nc.RunCache(tmp_path, {"who": "me"})
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    del run
    gc.collect()
    assert not lock.exists()


def test_lock_is_released_when_the_run_ends(tmp_path, problem):
    model, train, failures = problem
    res = netmend.identify(model, train, failures, "linear", cache_dir=tmp_path, **RUN)
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    del res
    gc.collect()
    assert not (tmp_path / ".lock").exists()


def test_record_copied_over_another_of_the_same_run_is_not_reused(tmp_path, problem):
    """Each record's key holds its own name: a record copied over another of the same run
    (same settings) used to be reused as that one (found by an outside-in trial)."""
    model, train, failures = problem
    kw = {**RUN, "k": "auto"}  # the automatic K: a call per half-split, each its own record
    netmend.identify(model, train, failures, "ewc", cache_dir=tmp_path, **kw)
    records = sorted(p.name for p in tmp_path.glob("result.call*.safetensors"))
    assert len(records) >= 2, records
    gc.collect()
    (tmp_path / records[0]).write_bytes((tmp_path / records[1]).read_bytes())
    with pytest.warns(UserWarning, match="as another record"):
        got = netmend.identify(model, train, failures, "ewc", cache_dir=tmp_path, **kw)
    ref = netmend.identify(model, train, failures, "ewc", **kw)
    np.testing.assert_array_equal(got.scores, ref.scores)


def test_garbled_settings_and_a_read_only_directory_say_what_to_do(tmp_path, problem, monkeypatch):
    """Found by an outside-in trial: a flipped byte in settings.json raised a bare
    UnicodeDecodeError, and a cache_dir without write permission a bare PermissionError."""
    model, train, failures = problem
    netmend.identify(model, train, failures, "linear", cache_dir=tmp_path, l2=1.0, **RUN)
    f = tmp_path / "settings.json"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] = 0xDD  # not UTF-8
    f.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"settings\.json is not valid JSON.*overwrite_cache"):
        netmend.identify(model, train, failures, "linear", cache_dir=tmp_path, l2=1.0, **RUN)
    # the fix it names works (overwrite_cache=True failed on the same garbled file)
    netmend.identify(model, train, failures, "linear", cache_dir=tmp_path, l2=1.0,
                     overwrite_cache=True, **RUN)  # fmt: skip
    assert json.loads(f.read_text())["method"] == "linear"
    real_open = os.open

    def read_only(path, flags, *a):  # type: ignore[no-untyped-def]
        if str(path).endswith(".lock") and flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *a)

    monkeypatch.setattr(nc.os, "open", read_only)
    with pytest.raises(ValueError, match="is not writable .*Pass a writable cache_dir"):
        netmend.identify(model, train, failures, "linear", cache_dir=tmp_path / "ro", **RUN)


def test_per_failure_after_the_data_changed_in_place_is_refused_not_cached(tmp_path, problem):
    """The per-failure pass runs on first access and is saved under the run's settings: on
    data changed in place since identify() it gave scores that did not match, and later runs
    on the original data were served them (found by an outside-in trial)."""
    model, (X, y), failures = problem
    ref = netmend.identify(model, (X, y), failures, "ewc", **RUN).per_failure
    Xc = X.clone()
    r = netmend.identify(model, (Xc, y), failures, "ewc", cache_dir=tmp_path, **RUN)
    Xc.mul_(2.0)  # e.g. an in-place normalisation
    with pytest.raises(ValueError, match="changed in place after identify"):
        _ = r.per_failure
    again = netmend.identify(model, (X, y), failures, "ewc", cache_dir=tmp_path, **RUN)
    np.testing.assert_allclose(again.per_failure, ref, rtol=1e-12, atol=0)
