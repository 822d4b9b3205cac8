"""Saved, resumable runs (netmend.cache): reuse, refusal, atomic writes, kill-and-resume."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import netmend
import netmend.store as nc
from netmend.data.streaming import map_chunks
from netmend.lab.models import MLP

DT = torch.float64
RUN = dict(progress=False, device="cpu", chunk_size=16)
WORKER = Path(__file__).with_name("_cache_worker.py")


@pytest.fixture
def problem(cache_problem):
    return cache_problem


def _counting(monkeypatch):
    """Count the calls of every identification method (patched into identify's lookup)."""
    calls: list[str] = []
    get = netmend.identification.get

    def counted(name):
        fn = get(name)

        @functools.wraps(fn)  # the same method, counted: the cache key is fn's
        def wrapped(ctx):
            calls.append(name)
            return fn(ctx)

        return wrapped

    monkeypatch.setattr(netmend.api.identification, "get", counted)
    return calls


@pytest.mark.parametrize("method", ["ewc", "linear"])
def test_rerun_reuses_fisher_and_scores_without_scoring(tmp_path, problem, monkeypatch, method):
    model, train, failures = problem
    plain = netmend.identify(model, train, failures, method, **RUN)
    calls = _counting(monkeypatch)
    first = netmend.identify(model, train, failures, method, cache_dir=tmp_path, **RUN)
    # all failures, then both halves of each half-split of the automatic k
    calls_per_run = 1 + 2 * netmend.api.AUTO_K_SPLITS
    assert calls == [method] * calls_per_run
    assert first.info["cache"]["examples_computed"] > 0
    calls.clear()
    second = netmend.identify(model, train, failures, method, cache_dir=tmp_path, **RUN)
    assert calls == []  # nothing scored
    assert second.info["cache"]["examples_computed"] == 0
    assert second.info["cache"]["results_reused"] == [f"call{i}" for i in range(calls_per_run)]
    for r in (first, second):  # bit-for-bit the uncached result
        np.testing.assert_array_equal(r.scores, plain.scores)
        np.testing.assert_array_equal(r.causes, plain.causes)
        assert torch.equal(r.fisher, plain.fisher)
    if method == "ewc":
        assert torch.equal(second.info["theta_plus_f"], plain.info["theta_plus_f"])
        assert second.info["steps"] == plain.info["steps"]
    # per-failure scores: computed once (rerunning the method lazily), then read back. The
    # rerun reads the method's passes back under their own numbers: with the Fisher loaded
    # they were numbered one off, taken for other inputs' passes, recomputed and overwritten
    passes = {p.name: p.read_bytes() for p in tmp_path.glob("pass.*")}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(second.per_failure, plain.per_failure)
    assert {p: (tmp_path / p).read_bytes() for p in passes} == passes
    assert all(".per_failure." in p.name for p in tmp_path.glob("pass.*") if p.name not in passes)
    third = netmend.identify(model, train, failures, method, cache_dir=tmp_path, **RUN)
    calls.clear()
    np.testing.assert_array_equal(third.per_failure, plain.per_failure)
    assert calls == []


def test_settings_that_do_not_change_scores_may_change(tmp_path, problem, monkeypatch):
    model, train, failures = problem
    base = netmend.identify(model, train, failures, k=3, cache_dir=tmp_path, **RUN)
    calls = _counting(monkeypatch)
    other = netmend.identify(
        model, train, failures, k="positive", cache_dir=tmp_path, progress=False, chunk_size=7
    )
    assert calls == []
    np.testing.assert_array_equal(other.scores, base.scores)
    np.testing.assert_array_equal(
        other.causes, netmend.identification.select(base.scores, "positive")
    )


def _variants(model, train, failures):
    """Each key field changed alone: (field named in the error, identify kwargs)."""
    (X, y), (Xf, yf) = train, failures
    moved = MLP(2, 3, hidden=(8,)).double().eval()
    moved.load_state_dict(model.state_dict())
    with torch.no_grad():
        moved.net[1].bias[0] += 1e-9
    y2 = y.clone()
    y2[0] = (y2[0] + 1) % 3
    X2 = X.clone()
    X2[3, 1] += 1e-12
    Xf2 = Xf.clone()
    Xf2[0, 0] += 1e-9
    swapped = MLP(2, 3, hidden=(8,)).double().eval()  # same parameters, another function
    swapped.load_state_dict(model.state_dict())
    swapped.net[2] = torch.nn.Tanh()

    class Scaled(netmend.ClassificationTask):  # same outputs, another task
        def __init__(self, s: float) -> None:
            self.s = s

        def inputs(self, x):  # type: ignore[no-untyped-def]
            return super().inputs(x) * self.s

    return [
        ("model", dict(model=moved)),
        # found by an outside-in trial: neither changes a parameter, both were reused
        ("model_outputs", dict(model=swapped)),
        ("task", dict(task=Scaled(1.0))),
        ("train", dict(train=(X, y2))),
        ("train", dict(train=(X2, y))),
        ("failures", dict(failures=(Xf2, yf))),
        ("method", dict(method="linear")),
        ("options", dict(steps=5)),
        ("l2", dict(l2=3.0)),
        ("seed", dict(seed=1)),
        ("dtype", dict(model=MLP(2, 3, hidden=(8,)).eval())),
        ("fisher", dict(fisher=torch.ones(sum(p.numel() for p in model.parameters()), dtype=DT))),
    ]


def test_changed_settings_are_refused_naming_the_field(tmp_path, problem, monkeypatch):
    model, train, failures = problem
    netmend.identify(model, train, failures, k=3, cache_dir=tmp_path, **RUN)
    stored = sorted(os.listdir(tmp_path))
    base = dict(model=model, train=train, failures=failures, method="ewc")
    for field, change in _variants(model, train, failures):
        kw = {**base, **change}
        if field == "dtype":  # a float32 model: the failures must stay failures for it
            m32 = kw["model"]
            m32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
        with pytest.raises(ValueError, match=rf"different settings: .*\b{field}[ .\[]") as err:
            netmend.identify(cache_dir=tmp_path, k=3, **RUN, **kw)
        msg = str(err.value)
        assert "another cache_dir" in msg and "overwrite_cache=True" in msg
        assert sorted(os.listdir(tmp_path)) == stored  # nothing written, nothing mixed
    monkeypatch.setattr(netmend.store, "__version__", "99.0")
    with pytest.raises(ValueError, match="netmend_version"):
        netmend.identify(model, train, failures, k=3, cache_dir=tmp_path, **RUN)


def test_overwrite_replaces_and_foreign_directories_are_refused(tmp_path, problem):
    model, train, failures = problem
    netmend.identify(model, train, failures, k=3, cache_dir=tmp_path, **RUN)
    plain = netmend.identify(model, train, failures, "linear", k=3, **RUN)
    res = netmend.identify(
        model, train, failures, "linear", k=3, cache_dir=tmp_path, overwrite_cache=True, **RUN
    )
    np.testing.assert_array_equal(res.scores, plain.scores)
    assert res.info["cache"]["results_reused"] == []
    assert json.loads((tmp_path / "settings.json").read_text())["method"] == "linear"
    assert not any("ewc" in p.name for p in tmp_path.iterdir())
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        netmend.identify(model, train, failures, k=3, cache_dir=foreign, **RUN)
    with pytest.raises(ValueError, match="did not write"):
        netmend.identify(
            model, train, failures, k=3, cache_dir=foreign, overwrite_cache=True, **RUN
        )
    assert (foreign / "notes.txt").read_text() == "mine"


def test_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "r.safetensors"
    old = {"value": torch.arange(5.0)}
    nc.save_tensors(path, old, {"done": 5})
    real = nc.save_file

    def dies_midway(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:  # half a file on disk, then the process "dies"
            f.truncate(os.path.getsize(filename) // 2)
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(nc, "save_file", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        nc.save_tensors(path, {"value": torch.arange(1000.0)}, {"done": 1000})
    tensors, meta = nc.load_tensors(path)
    assert torch.equal(tensors["value"], old["value"]) and meta == {"done": 5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.safetensors"]  # no temporary left
    monkeypatch.setattr(nc, "save_file", real)

    seen = []

    def watch(tensors, filename, metadata=None):  # while writing, the final name is the old file
        seen.append(nc.load_tensors(path)[1])
        assert Path(filename).parent == path.parent and Path(filename) != path
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(nc, "save_file", watch)
    nc.save_tensors(path, {"value": torch.arange(3.0)}, {"done": 3})
    assert seen == [{"done": 5}] and nc.load_tensors(path)[1] == {"done": 3}


@pytest.mark.parametrize("reduce", ["cat", "sum"])
@pytest.mark.parametrize("resume_chunk", [5, 3])
def test_map_chunks_resumes_after_an_interruption(tmp_path, reduce, resume_chunk):
    """Interrupted after 3 chunks: the rerun computes only the rest; same chunking, same bits."""
    g = torch.Generator().manual_seed(0)
    data = torch.randn(23, 4, generator=g, dtype=DT)
    kw = dict(desc="t", reduce=reduce, init=torch.zeros(4, dtype=DT) if reduce == "sum" else None)

    def fn(s):
        return (data[s].exp() * 1.7).sum(0) if reduce == "sum" else (data[s].exp() * 1.7)

    straight = map_chunks(23, 5, fn, **kw)
    run = nc.RunCache(tmp_path, {"k": 1}, checkpoint_seconds=0.0)
    seen: list[int] = []

    def fails_at_4th(s):
        if len(seen) == 3:
            raise RuntimeError("interrupted")
        seen.append(s.start)
        return fn(s)

    with run.activated("x"), pytest.raises(RuntimeError):
        map_chunks(23, 5, fails_at_4th, **kw)
    rerun = nc.RunCache(tmp_path, {"k": 1})
    starts: list[int] = []

    def record(s):
        starts.append(s.start)
        return fn(s)

    with rerun.activated("x"):
        out = map_chunks(23, resume_chunk, record, **kw)
    assert starts[0] == 15 and len(starts) == len(range(15, 23, resume_chunk))
    assert rerun.passes == [{"label": "pass.x.000.t", "skipped": 15, "computed": 8}]
    if resume_chunk == 5:
        assert torch.equal(out, straight)
    else:  # another chunk size resumes at the same example; equal up to rounding
        torch.testing.assert_close(out, straight, rtol=1e-12, atol=1e-14)
    with nc.RunCache(tmp_path, {"k": 1}).activated("x"):  # finished: nothing computed
        again = map_chunks(23, 5, lambda s: pytest.fail("recomputed"), **kw)
    assert torch.equal(again, out)


def test_checkpoint_with_other_inputs_is_discarded(tmp_path):
    with nc.RunCache(tmp_path, {"k": 1}).activated("x"):
        map_chunks(4, 2, lambda s: torch.ones(s.stop - s.start), fingerprint=lambda: "a")
    with nc.RunCache(tmp_path, {"k": 1}).activated("x"), pytest.warns(UserWarning, match="other"):
        out = map_chunks(4, 2, lambda s: torch.zeros(s.stop - s.start), fingerprint=lambda: "b")
    assert torch.equal(out, torch.zeros(4))


def test_hashes_see_values_not_layout():
    a = torch.randn(7, 5, dtype=DT)
    assert nc.tensor_hash(a.T) == nc.tensor_hash(a.T.contiguous())
    assert nc.tensor_hash(a) != nc.tensor_hash(a.T.contiguous())  # shape is part of it
    b = a.clone()
    b[6, 4] = torch.nextafter(b[6, 4], torch.tensor(np.inf, dtype=DT))
    assert nc.tensor_hash(a) != nc.tensor_hash(b)
    assert nc.tensor_hash(a, block_bytes=16) == nc.tensor_hash(a)
    assert nc.jsonable({"w": a})["w"] == {"tensor": nc.tensor_hash(a)}


def test_identify_is_deterministic_given_seed(problem):
    model, train, failures = problem
    a = netmend.identify(model, train, failures, "random", seed=3, **RUN)
    b = netmend.identify(model, train, failures, "random", seed=3, **RUN)
    c = netmend.identify(model, train, failures, "random", seed=4, **RUN)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.causes, b.causes)
    assert not np.array_equal(a.scores, c.scores)
    d = netmend.identify(model, train, failures, seed=3, **RUN)
    e = netmend.identify(model, train, failures, seed=3, **RUN)
    np.testing.assert_array_equal(d.scores, e.scores)
    np.testing.assert_array_equal(d.causes, e.causes)


def _load_worker():
    spec = importlib.util.spec_from_file_location("_cache_worker", WORKER)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _partial_passes(cache_dir: Path) -> dict[str, dict]:
    out = {}
    for p in cache_dir.glob("pass.*.safetensors"):
        try:
            meta = nc.load_tensors(p)[1]
        except (FileNotFoundError, nc.CacheRecordError):
            # listed, then replaced or dropped by the running worker. A read racing the
            # worker's (atomic) replacement of the file also failed its checksum, 3 times in
            # ~10 runs on a heavily loaded machine (cause not pinned down). After the kill, a
            # record missing here fails the assertions below.
            continue
        except Exception:  # noqa: BLE001 - atomic writes: cannot happen; fail loudly below
            raise AssertionError(f"unreadable checkpoint {p.name}") from None
        out[p.name] = meta
    return out


def test_killed_run_resumes_with_identical_scores(tmp_path):
    """SIGKILL a real process in the middle of a pass; the rerun skips the finished chunks."""
    worker = _load_worker()
    cache_dir = tmp_path / "run"
    env = dict(os.environ, NETMEND_TEST_SLEEP="0.15", PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), str(cache_dir), str(tmp_path / "out")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    target = "pass.call0.001.ll.safetensors"  # the EWC's first log-likelihood pass (3 chunks)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            metas = _partial_passes(cache_dir) if cache_dir.exists() else {}
            if target in metas and not metas[target]["complete"]:
                break
            time.sleep(0.01)
        assert proc.poll() is None, f"worker ended first: {proc.stderr.read().decode()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    metas = _partial_passes(cache_dir)
    assert metas["pass.call0.000.fisher.safetensors"]["complete"]
    done = metas[target]["done"]
    assert 0 < done < worker.N and not (tmp_path / "out").exists()

    model, train, failures = worker.problem()
    kw = dict(chunk_size=worker.CHUNK, progress=False, device="cpu")
    resumed = netmend.identify(model, train, failures, "ewc", cache_dir=cache_dir, **kw)
    plain = netmend.identify(model, train, failures, "ewc", **kw)
    np.testing.assert_array_equal(resumed.scores, plain.scores)
    np.testing.assert_array_equal(resumed.causes, plain.causes)
    assert torch.equal(resumed.fisher, plain.fisher)
    passes = {p["label"]: p for p in resumed.info["cache"]["passes"]}
    assert passes["pass.call0.000.fisher"] == {
        "label": "pass.call0.000.fisher", "skipped": worker.N, "computed": 0
    }  # fmt: skip
    assert passes["pass.call0.001.ll"]["skipped"] == done
    assert passes["pass.call0.002.ll"]["skipped"] == 0


def test_repair_passes_cache_dir_to_identify(tmp_path, problem):
    model, train, failures = problem
    kw = dict(identify="linear", treat="newton", k=3, **RUN)
    a = netmend.repair(model, train, failures, cache_dir=tmp_path, **kw)
    b = netmend.repair(model, train, failures, cache_dir=tmp_path, **kw)
    assert a.identification.info["cache"]["results_reused"] == []
    assert b.identification.info["cache"]["results_reused"] == ["call0"]
    np.testing.assert_array_equal(a.scores, b.scores)


def test_written_files_get_the_mode_open_would_give(tmp_path):
    """safetensors replaces the 0600 temporary it writes into; outputs were left 0600 while
    JSON and CSV got 0644 (outside-in trial)."""
    import os

    from netmend.store import save_tensors, write_json_atomic

    umask = os.umask(0o022)
    try:
        save_tensors(tmp_path / "a.safetensors", {"x": torch.zeros(2)})
        write_json_atomic(tmp_path / "b.json", {})
    finally:
        os.umask(umask)
    for name in ("a.safetensors", "b.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


def test_an_edited_method_is_not_read_back_from_the_cache(tmp_path, problem, monkeypatch):
    """A plug-in author fixed a sign and reran with the same cache_dir: the cache key held
    the method's name only, and the old causes came back with no word."""
    from netmend.identification import base as ident_base

    model, train, failures = problem

    def up(ctx):
        return ident_base.MethodOutput(scores=np.arange(ctx.N, dtype=np.float64))

    def down(ctx):
        return ident_base.MethodOutput(scores=-np.arange(ctx.N, dtype=np.float64))

    monkeypatch.setitem(ident_base._REGISTRY._items, "edited-test", up)
    first = netmend.identify(model, train, failures, "edited-test", k=3, cache_dir=tmp_path, **RUN)
    monkeypatch.setitem(ident_base._REGISTRY._items, "edited-test", down)
    with pytest.raises(ValueError, match="different settings"):
        netmend.identify(model, train, failures, "edited-test", k=3, cache_dir=tmp_path, **RUN)
    again = netmend.identify(model, train, failures, "edited-test", k=3, cache_dir=tmp_path,
                             overwrite_cache=True, **RUN)  # fmt: skip
    assert first.causes.tolist() != again.causes.tolist() == [0, 1, 2]


def test_a_whole_float_option_and_a_function_option_keep_one_key():
    """l2=100 then l2=100.0 recomputed every record, warning they came from 'another cache
    directory'; a function option's key held its memory address, so no new process reused it."""

    def square(x):
        return x * x

    assert nc.jsonable({"l2": 100.0}) == nc.jsonable({"l2": 100}) == {"l2": 100}
    assert nc.jsonable(0.5) == 0.5 and nc.jsonable(float("inf")) == "inf"
    key = nc.jsonable({"weight_fn": square})["weight_fn"]
    assert key == {"function": nc.code_fingerprint(square)} and "0x" not in str(key)
    script = (
        "import netmend.store as nc\n"
        "def square(x):\n    return x * x\n"
        "print(nc.code_fingerprint(square).split(':')[1])"
    )
    runs = {
        subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": s},
            check=True,
        ).stdout  # fmt: skip
        for s in ("1", "2")
    }
    assert len(runs) == 1  # the same in every process


def test_a_refusal_names_where_nested_settings_differ(tmp_path):
    """Two long option values cut at the same 57-character prefix showed no difference."""
    long = [{"array": "99b7628cd11ad34b428b1e7103709e35"}, {"array": "a" * 32}]
    nc.RunCache(tmp_path, {"options": {"valid": long, "K": 5}, "seed": 0})
    changed = [long[0], {"array": "b" * 32}]
    with pytest.raises(ValueError, match=r"options\.valid\[1\]\.array \(\"a{32}\" there, \"b{32}"):
        nc.RunCache(tmp_path, {"options": {"valid": changed, "K": 5}, "seed": 0})
    with pytest.raises(ValueError, match=r"options\.K \(5 there, 7 here\), seed \(0 there, 1 here"):
        nc.RunCache(tmp_path, {"options": {"valid": long, "K": 7}, "seed": 1})

    from netmend.store import _differences

    assert _differences({"a": None}, {}, "options") == [("options.a", None, "(absent)")]
    assert _differences({"k": 1}, {"k": 1.5}, "options") == [("options.k", 1, 1.5)]
