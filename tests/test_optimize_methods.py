"""`optimize` over several methods (`method=[...]|"auto"`, `vflowopt optimize --methods`), and several
processes sharing one study storage."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import optuna
import pytest
import torch

import vflowopt
from vflowopt.api import active_handle
from vflowopt.cli import main
from vflowopt.search import Objective, run_method_search, run_optimization
from vflowopt.search.ranking import resolve_methods, split_trials


def _search(model, samples, methods, budget=0.25, trials=4, **kw):
    kw.setdefault("storage", optuna.storages.InMemoryStorage())
    kw.setdefault("progress", False)
    return run_method_search(model, samples, budget, methods, trials=trials, **kw)


def test_best_method_wins_every_row_is_real_and_references_are_computed_once(tiny, samples, monkeypatch):
    model, _ = tiny
    references = []
    original = Objective.last_token_state

    def spy(self, sample):
        if active_handle(self.model) is None:  # an unpruned forward: a reference
            references.append(1)
        return original(self, sample)

    monkeypatch.setattr(Objective, "last_token_state", spy)
    # on the 6-layer tiny model at 0.25: random has nothing to tune, visionzip and fastv are searched
    # (fastv's default K = 2 cannot meet 0.25 there, K = 1 can), vtw cannot meet 0.25 (not a multiple of 1/6)
    result = _search(model, samples, ["random", "visionzip", "fastv", "vtw"], trials=5)
    assert len(references) == len(samples)  # one reference per sample for all methods together
    rows = {r.method: r for r in result.ranking}
    assert [r.method for r in result.ranking][-1] == "vtw" and rows["vtw"].status == "refused"
    assert "1/6" in rows["vtw"].reason
    assert rows["random"].source == "untuned" and rows["random"].trials == 0
    assert result.trials_split == {"visionzip": 3, "fastv": 2}
    assert rows["visionzip"].trials == 3 and rows["fastv"].trials == 2
    assert rows["fastv"].config.layer == 1  # found in the box although the default is refused
    ok = [r for r in result.ranking if r.status == "ok"]
    assert [r.value for r in ok] == sorted((r.value for r in ok), reverse=True)
    assert result.config.to_dict() == ok[0].config.to_dict() and result.value == ok[0].value
    # every row's objective is what its strategy scores when evaluated afresh
    fresh = Objective(model, samples)
    for row in ok:
        assert fresh.evaluate(row.config).value == pytest.approx(row.value, abs=1e-4)
        assert row.mean_retention == pytest.approx(0.25, abs=0.02)
    assert vflowopt.optimize(model, samples, 0.25, trials=5, method=["random", "visionzip", "fastv", "vtw"],
                             storage=optuna.storages.InMemoryStorage(), progress=False).to_dict() \
        == result.config.to_dict()


def test_auto_is_every_registered_method_and_resume_runs_nothing_new(tiny, samples, tmp_path):
    model, _ = tiny
    db = f"sqlite:///{tmp_path / 's.db'}"
    first = _search(model, samples, "auto", trials=2, storage=db)
    assert {r.method for r in first.ranking} == set(vflowopt.available_methods())
    assert sum(r.trials for r in first.ranking) == sum(first.trials_split.values())
    again = _search(model, samples, "all", trials=2, storage=db)
    rows = [(r.method, r.value, r.trials) for r in first.ranking]
    assert [(r.method, r.value, r.trials) for r in again.ranking] == rows
    # a method's study is the same one a single-method run uses
    single = run_optimization(model, samples, 0.25, trials=1, storage=db, method="visionzip", progress=False)
    assert single.trials_new == 0 and single.study_name == "visionzip-budget0.25"


def test_bad_input_over_methods(tiny, samples):
    model, _ = tiny
    with pytest.raises(vflowopt.ConfigError, match="unknown method 'nope'; known: .*random"):
        _search(model, samples, ["random", "nope"])
    with pytest.raises(vflowopt.ConfigError, match="non-empty list"):
        _search(model, samples, [])
    # every named method refuses the budget: each reason is given
    with pytest.raises(vflowopt.ConfigError) as info:
        _search(model, samples, ["vtw", "fastv"], budget=0.05)
    message = str(info.value)
    assert "no method can meet budget 0.05" in message and "vtw: " in message and "fastv: " in message
    with pytest.raises(vflowopt.ConfigError, match="apply to one method"):
        vflowopt.optimize(model, samples, 0.25, method="auto", space=object(), progress=False)
    assert resolve_methods("AUTO") == vflowopt.available_methods()
    assert split_trials(7, ["a", "b", "c"]) == {"a": 3, "b": 2, "c": 2}
    assert split_trials(1, ["a", "b"]) == {"a": 1, "b": 1}


def test_cli_methods_ranking_json_plot_and_errors(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["optimize", "--methods", "random,visionzip", "--budget", "0.25", "--trials", "2", "--samples", "2",
            "--plot", "rank.png"]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["methods"] == ["random", "visionzip"] and report["trials_split"] == {"visionzip": 2}
    assert [r["method"] for r in report["ranking"]] == [report["method"], *(
        m for m in ("random", "visionzip") if m != report["method"])]
    assert report["out"] == "auto-budget0.25.json"
    assert vflowopt.load_config(tmp_path / "auto-budget0.25.json").method == report["method"]
    assert (tmp_path / "rank.png").read_bytes()[:4] == b"\x89PNG"
    assert main(args) == 0  # the table, resumed from the same storage
    out = capsys.readouterr().out
    assert "Methods ranked by the objective" in out and "nothing to tune" in out and "best:" in out

    for bad, message in ((["--methods", "random,nope"], "unknown method 'nope'"),
                         (["--methods", "random", "--method", "random"], "not allowed with argument")):
        code = main(["optimize", "--budget", "0.25", *bad])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err
    code = main(["optimize", "--budget", "0.05", "--methods", "vtw", "--samples", "1", "--trials", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "no method can meet budget 0.05" in err and "vtw:" in err


_WORKER = textwrap.dedent(
    """
    import sys, optuna, vflowopt
    from vflowopt.tiny import build_inputs, example_image, tiny_llava_onevision
    from vflowopt.search import run_optimization
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    model, processor = tiny_llava_onevision(attn_implementation="sdpa")
    samples = [build_inputs(processor, [example_image(seed=0)], ["What is in the image?"])]
    open(sys.argv[2], "w").close()  # ready
    import os, time
    while not os.path.exists(sys.argv[3]):
        time.sleep(0.01)
    r = run_optimization(model, samples, 0.25, trials=6, storage=sys.argv[1], progress=False, n_startup_trials=6)
    print(r.trials_new)
    """
)


def test_two_processes_on_one_storage_end_with_exactly_the_asked_trials(tmp_path):
    """Two real processes started at the same instant with --trials 6 on one SQLite file: 6 COMPLETE."""
    db = f"sqlite:///{tmp_path / 'shared.db'}"
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = []
    for i in range(2):
        ready = tmp_path / f"ready{i}"
        procs.append((subprocess.Popen([sys.executable, "-c", _WORKER, db, str(ready), str(go)], env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), ready))
    import time

    deadline = time.time() + 120
    while not all(r.exists() for _, r in procs):
        assert time.time() < deadline and all(p.poll() is None for p, _ in procs), "workers did not start"
        time.sleep(0.05)
    go.touch()
    new = []
    for p, _ in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        new.append(int(out.strip().splitlines()[-1]))
    study = optuna.load_study(study_name="vflowopt-budget0.25", storage=db)
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 6
    assert sum(new) >= 6 and min(new) >= 1  # both took part
    assert optuna.trial.TrialState.RUNNING not in states


def test_a_leftover_trial_of_a_dead_process_does_not_count(tiny, samples, tmp_path):
    """A RUNNING trial tagged by a process that no longer exists (kill -9) is ignored at once."""
    model, _ = tiny
    db = optuna.storages.InMemoryStorage()
    run_optimization(model, samples, 0.25, trials=2, storage=db, progress=False)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    study = optuna.load_study(study_name="vflowopt-budget0.25", storage=db)
    killed = study.ask()
    killed.set_user_attr("vflowopt_owner", f"{socket.gethostname()}:{dead.pid}")
    result = run_optimization(model, samples, 0.25, trials=3, storage=db, progress=False)
    assert result.trials_complete == 3 and result.trials_new == 1 and result.trials_running_ignored == 1
    assert torch.isfinite(torch.tensor(result.value))


def test_optimize_trials_do_not_warn_about_empty_calibration_sets(tiny, samples, recwarn):
    import warnings

    model, _ = tiny
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        cfg = vflowopt.VFlowOptConfig(budget=0.25, threshold=49.0)  # K empty on the tiny model
        Objective(model, samples).evaluate(cfg)
        assert not [w for w in recwarn if issubclass(w.category, vflowopt.CalibrationWarning)]
        with pytest.warns(vflowopt.CalibrationWarning), vflowopt.pruned(model, cfg):
            model(**samples[0])  # outside optimize the warning is given
