"""Strategy optimization (`vflowopt.optimize`, `vflowopt optimize`) on the tiny offline models."""

from __future__ import annotations

import dataclasses
import json
import math

import optuna
import pytest
import torch

import vflowopt
import vflowopt.tiny
from vflowopt.cli import main
from vflowopt.search import Objective, run_optimization
from vflowopt.search.space import space_for
from vflowopt.tiny import build_inputs, example_image

PROMPT = "What is in the image?"


def _run(model, samples, budget=0.25, trials=3, **kw):
    kw.setdefault("storage", optuna.storages.InMemoryStorage())
    kw.setdefault("progress", False)
    return run_optimization(model, samples, budget, trials=trials, **kw)


def test_budget_one_objective_equals_number_of_samples(tiny, samples):
    model, _ = tiny
    result = _run(model, samples, budget=1.0, trials=2)
    assert result.value == pytest.approx(len(samples), abs=1e-4)
    assert result.default_value == pytest.approx(len(samples), abs=1e-4)
    assert result.config.retention == pytest.approx((1.0, 1.0, 1.0))
    # the references are computed once and reused
    objective = Objective(model, samples)
    refs = objective.references()
    assert objective.references() is refs


def _kv_visual_counts(model, x, handle) -> tuple[list[int], int]:
    with torch.inference_mode():
        out = model(**x)
    cache = out.past_key_values
    n_visual = handle.stats.visual_tokens
    other = int(x["input_ids"].shape[1]) - int((x["input_ids"] == model.config.image_token_id).sum())
    newline = int((x["input_ids"] == model.config.image_token_id).sum()) - n_visual
    return [cache.get_seq_length(i) - other - newline for i in range(len(cache.layers))], n_visual


def test_returned_strategy_meets_its_budget_in_the_kv_caches(tiny, samples, tmp_path):
    model, _ = tiny
    budget = 0.25
    result = _run(model, samples, budget=budget, trials=3, out=tmp_path / "s.json")
    cfg = result.config
    assert cfg.model_family == "llava_onevision" and cfg.num_layers == 6
    assert 0.0 <= cfg.retention[2] <= 1.0
    with vflowopt.pruned(model, cfg) as handle:
        for x in samples:
            per_layer, n_visual = _kv_visual_counts(model, x, handle)
            assert per_layer == handle.stats.visual_tokens_per_layer
            mean = sum(per_layer) / (len(per_layer) * n_visual)
            # rounding: at most about one token per stage away from the exact budget
            assert abs(mean - budget) <= 1.5 / n_visual, (per_layer, n_visual)
            assert handle.stats.mean_retention == pytest.approx(mean)


def test_infeasible_candidates_are_reported_and_never_best(tiny, samples):
    model, _ = tiny
    budget = 0.25
    space = space_for("vflowopt", budget, 6, grid_side=4).with_bounds(R1=(0.25, 1.0), R2=(0.05, 1.0))
    assert space.feasible_fraction() < 0.6
    storage = optuna.storages.InMemoryStorage()
    result = _run(model, samples, budget=budget, trials=6, space=space, n_startup_trials=4, storage=storage)
    trials = result.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    infeasible = [t for t in trials if not t.user_attrs["feasible"]]
    assert infeasible, "the crafted box should produce infeasible candidates"
    for t in infeasible:  # reported to the sampler, R3 recorded unclipped
        assert t.constraints["budget"] > 0
        assert not 0.0 <= t.user_attrs["R3"] <= 1.0
    assert 0.0 <= result.config.retention[2] <= 1.0
    assert result.trials_feasible == len(trials) - len(infeasible)

    # An infeasible point with a (lying) huge value in the storage is still never the best.
    params = {"R1": 0.25, "R2": 0.05, "t": 1.0, "alpha": 0.0, "a": 1.5}
    assert not space.candidate(params).feasible
    liar = optuna.trial.create_trial(
        params=params, distributions=space.distributions(), value=1e6, user_attrs={"feasible": True},
    )
    liar.set_constraint("budget", -1.0)
    result.study.add_trial(liar)
    again = _run(model, samples, budget=budget, trials=8, space=space, n_startup_trials=4, storage=storage)
    assert again.value < 1e6 and again.value <= len(samples) + 1e-4
    assert 0.0 <= again.config.retention[2] <= 1.0


def test_same_seed_same_strategy_and_resume_matches_uninterrupted(tiny, samples, tmp_path):
    model, _ = tiny
    a = _run(model, samples, trials=4, seed=3, n_startup_trials=2)
    # Same seed, interrupted at 2 of 4 and resumed on a SQLite file: the same trials (Sobol startup
    # points and GP proposals) and the same strategy as the uninterrupted in-memory run.
    db = f"sqlite:///{tmp_path / 'study.db'}"
    first = _run(model, samples, trials=2, seed=3, n_startup_trials=2, storage=db)
    assert first.trials_complete == 2
    resumed = _run(model, samples, trials=4, seed=3, n_startup_trials=2, storage=db)
    assert resumed.trials_complete == 4 and resumed.trials_new == 2
    assert [t.params for t in resumed.study.trials] == [t.params for t in a.study.trials]
    assert resumed.config.to_dict() == a.config.to_dict()
    # asking for fewer than are done runs nothing
    assert _run(model, samples, trials=3, seed=3, storage=db).trials_new == 0


def test_a_killed_trial_does_not_change_what_the_resumed_run_proposes(tiny, samples, tmp_path):
    """As after `kill -9` mid-trial: the study holds a RUNNING (then FAIL) trial between the two runs;
    the resumed run proposes the same points, and finds the same strategy, as an uninterrupted one."""
    model, _ = tiny
    straight = _run(model, samples, trials=5, seed=4, n_startup_trials=3)
    db = f"sqlite:///{tmp_path / 'killed.db'}"
    _run(model, samples, trials=2, seed=4, n_startup_trials=3, storage=db)
    storage = optuna.storages.RDBStorage(db)
    study = optuna.load_study(study_name="vflowopt-budget0.25", storage=storage)
    killed = study.ask()
    killed.suggest_float("R1", 0.25, 0.375)
    storage.set_trial_state_values(killed._trial_id, optuna.trial.TrialState.FAIL)  # what a stale heartbeat does
    resumed = _run(model, samples, trials=5, seed=4, n_startup_trials=3, storage=db)
    complete = [t.params for t in resumed.study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete == [t.params for t in straight.study.trials]
    assert resumed.config.to_dict() == straight.config.to_dict()


def test_leftover_running_trial_is_ignored(tiny, samples, monkeypatch):
    """An untagged RUNNING trial (a process killed between creating and tagging it) stops counting
    after UNTAGGED_GRACE_S (10 s; 0 here so the test does not wait)."""
    monkeypatch.setattr("vflowopt.search.study.UNTAGGED_GRACE_S", 0.0)
    model, _ = tiny
    db = optuna.storages.InMemoryStorage()
    _run(model, samples, trials=2, storage=db)
    study = optuna.load_study(study_name="vflowopt-budget0.25", storage=db)
    killed = study.ask()  # as if the process died mid-trial
    killed.suggest_float("R1", 0.25, 0.375)
    result = _run(model, samples, trials=4, storage=db)
    assert result.trials_complete == 4
    assert result.trials_running_ignored == 1
    states = [t.state for t in result.study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 4


def test_ctrl_c_keeps_finished_trials(tiny, samples):
    model, _ = tiny
    storage = optuna.storages.InMemoryStorage()

    def interrupt(study, trial):
        if trial.number == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(model, samples, trials=4, storage=storage, callbacks=[interrupt])
    resumed = _run(model, samples, trials=3, storage=storage)
    assert resumed.trials_new == 1 and resumed.trials_complete == 3


def test_nan_cosine_counts_as_zero(tiny, samples):
    model, _ = tiny
    objective = Objective(model, samples)
    objective._references = torch.full_like(objective.references(), float("nan"))
    ev = objective.evaluate(vflowopt.VFlowOptConfig(budget=0.5))
    assert ev.value == 0.0 and ev.nan_samples == len(samples)


def test_strategy_json_round_trips_and_applies(tiny, samples, tmp_path):
    model, _ = tiny
    path = tmp_path / "out" / "strategy.json"
    cfg = vflowopt.optimize(model, samples, 0.5, trials=2, storage=optuna.storages.InMemoryStorage(),
                            out=path, progress=False)
    loaded = vflowopt.load_config(path)
    assert loaded == cfg
    with vflowopt.pruned(model, loaded) as handle, torch.inference_mode():
        model(**samples[0])
    assert handle.stats.mean_retention == pytest.approx(0.5, abs=0.1)
    assert not list(path.parent.glob(".*.tmp")), "atomic save leaves no temporary file"


def test_refuses_to_mix_studies(tiny, samples, make_model):
    model, _ = tiny
    db = optuna.storages.InMemoryStorage()
    _run(model, samples, trials=1, storage=db, study_name="s")
    with pytest.raises(vflowopt.ConfigError, match="another budget"):
        _run(model, samples, budget=0.5, trials=1, storage=db, study_name="s")
    other, processor = make_model("llava")
    other_samples = [build_inputs(processor, [example_image(seed=0)], [PROMPT])]
    with pytest.raises(vflowopt.ConfigError, match="another model"):
        _run(other, other_samples, trials=1, storage=db, study_name="s")
    with pytest.raises(vflowopt.ConfigError, match="other samples"):
        _run(model, samples[:1], trials=1, storage=db, study_name="s")


def test_bad_api_input(tiny, samples, tmp_path, monkeypatch):
    model, processor = tiny
    with pytest.raises(vflowopt.ConfigError, match="no samples"):
        _run(model, [], trials=1)
    text_only = [build_inputs(processor, None, [PROMPT])]
    with pytest.raises(vflowopt.ConfigError, match="no image"):
        _run(model, text_only, trials=1)
    for budget in (0.0, 1.5, float("nan")):
        with pytest.raises(vflowopt.ConfigError, match="budget"):
            _run(model, samples, budget=budget, trials=1)
    # one rule with prune(): a budget below 1/n keeps one token per image and stage, it is not refused
    tiny_budget = _run(model, samples, budget=0.001, trials=1)
    assert tiny_budget.config.budget == 0.001
    with pytest.raises(vflowopt.ConfigError, match="does not exist"):
        _run(model, samples, trials=1, storage=f"sqlite:///{tmp_path / 'missing' / 'x.db'}")
    not_a_db = tmp_path / "text.db"
    not_a_db.write_text("not a database " * 100)
    with pytest.raises(vflowopt.ConfigError, match="cannot open study storage"):
        _run(model, samples, trials=1, storage=str(not_a_db))
    with pytest.raises(vflowopt.ConfigError, match="cannot open study storage"):
        _run(model, samples, trials=1, storage="nosuchdriver://x")

    # a method without a search space cannot be optimized
    from vflowopt import registry

    @dataclasses.dataclass
    class NoSpaceConfig(vflowopt.PruneConfig):
        def resolve(self, adapter):
            return self

    monkeypatch.setitem(registry._REGISTRY, "nospace", (NoSpaceConfig, object))
    monkeypatch.setattr(NoSpaceConfig, "method", "nospace")
    with pytest.raises(vflowopt.ConfigError, match="declares no search space"):
        _run(model, samples, trials=1, method="nospace")


def test_search_space_is_derived_from_budget_and_model():
    space = vflowopt.VFlowOptConfig.search_space(0.25, 28, stage_layers=(9, 18), grid_side=27)
    bounds = space.summary()
    assert bounds["R1"] == [0.25, 0.375]
    assert bounds["t"] == [0.0, 50.0] and bounds["a"] == [3.0, 24.0] and bounds["alpha"] == [-1.0, 1.0]
    assert bounds["R2"][0] == pytest.approx((0.25 * 28 / 0.3125 - 9) / 19)
    assert space.feasible_fraction() > 0.7
    # the official strategies (reference/seeds.md §1.7) lie inside their boxes and are feasible
    for budget, r1, r2 in ((0.25, 0.26510, 0.98334), (0.1, 0.11662, 1.0), (0.5, 0.72332, 0.74875)):
        s = vflowopt.VFlowOptConfig.search_space(budget, 28, stage_layers=(9, 18), grid_side=27)
        lo, hi = s.summary()["R2"]
        assert lo <= r2 <= hi
        assert s.candidate({"R1": r1, "R2": r2, "t": 30, "alpha": 0, "a": 12}).feasible
    cand = space.candidate({"R1": 0.25, "R2": 0.8, "t": 1, "alpha": 0, "a": 3})
    assert not cand.feasible and cand.info["R3"] > 1  # reported, not clipped
    tiny_space = vflowopt.VFlowOptConfig.search_space(0.1, 6, grid_side=4).summary()
    assert tiny_space["t"] == [0.0, 16.0] and tiny_space["a"][0] == 1.0


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def _save_model_dir(path, model, processor):
    model.save_pretrained(path)
    processor.image_processor.save_pretrained(path)
    processor.tokenizer.save_pretrained(path)
    (path / "processor_config.json").write_text(json.dumps({
        "processor_class": "LlavaOnevisionProcessor",
        "num_image_tokens": processor.num_image_tokens,
        "vision_feature_select_strategy": processor.vision_feature_select_strategy,
        "vision_aspect_ratio": processor.vision_aspect_ratio,
        "chat_template": processor.chat_template,
    }))


def test_cli_end_to_end_on_a_saved_model(capsys, tmp_path, tiny):
    model, processor = tiny
    model_dir = tmp_path / "model"
    _save_model_dir(model_dir, model, processor)
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    example_image(seed=1).save(data / "img" / "a.png")
    example_image(seed=2, size=(100, 60)).save(tmp_path / "b.png")
    (data / "broken.png").write_text("not an image")
    lines = [{"image": "img/a.png", "prompt": PROMPT}, {"image": "broken.png", "prompt": PROMPT},
             {"image": str(tmp_path / "b.png"), "prompt": "Describe the image."}]
    (data / "cal.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    out, plot = tmp_path / "strategy.json", tmp_path / "history.png"
    args = ["optimize", "--model", str(model_dir), "--data", str(data / "cal.jsonl"), "--budget", "0.25",
            "--trials", "2", "--samples", "3", "--out", str(out), "--plot", str(plot), "--json"]
    assert main(args) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert "broken.png" in captured.err and "warning" in captured.err
    assert report["samples"] == 2 and report["trials_complete"] == 2 and report["random_weights"] is False
    assert report["storage"] == f"sqlite:///{tmp_path / 'vflowopt-study.db'}"
    assert math.isfinite(report["objective"]) and math.isfinite(report["default_objective"])
    assert plot.stat().st_size > 1000 and plot.read_bytes()[:4] == b"\x89PNG"
    cfg = vflowopt.load_config(out)
    assert cfg.model_family == "llava_onevision" and cfg.budget == 0.25

    # re-running continues the same study; the strategy works with `vflowopt run --strategy`
    assert main([*args[:-5], "--trials", "3", "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["trials_new"] == 1
    assert main(["run", "--model", str(model_dir), "--strategy", str(out), "--prompt", PROMPT,
                 "--max-new-tokens", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mean_retention"] == pytest.approx(0.25, abs=0.05)


def test_cli_default_data_and_model(capsys, tmp_path, monkeypatch):
    """No --model, no --data: the shipped VQA model on the shipped sample scenes."""
    monkeypatch.chdir(tmp_path)
    assert main(["optimize", "--budget", "0.5", "--trials", "1", "--samples", "2"]) == 0
    out = capsys.readouterr().out
    assert "No --model given" in out and "sample scenes shipped with vflowopt" in out
    for label in ("Best strategy found", "objective (best)", "objective (default)", "retention R1, R2, R3"):
        assert label in out
    assert (tmp_path / "vflowopt-budget0.5.json").is_file() and (tmp_path / "vflowopt-study.db").is_file()


def test_cli_checks_the_space_against_the_loaded_models_depth(capsys, tmp_path, monkeypatch):
    """FastV at 0.25 needs K <= 2 on the 8-layer shipped model: accepted (it was once checked against a
    hard-coded 3-layer depth and refused); a budget the depth cannot meet is refused after loading."""
    monkeypatch.chdir(tmp_path)
    assert main(["optimize", "--method", "fastv", "--budget", "0.25", "--trials", "1", "--samples", "2"]) == 0
    assert (tmp_path / "fastv-budget0.25.json").is_file()
    assert main(["optimize", "--method", "fastv", "--budget", "0.1", "--trials", "1", "--samples", "2"]) == 2
    assert "budget" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "is empty"),
        ("\n\n", "is empty"),
        ('{"image": "a.png", "prompt": "x"}\n{"image": "a.png" "prompt": 1}\n', "line 2: not valid JSON"),
        ('{"image": "a.png"}\n', "line 1: 'prompt'"),
        ('["a.png", "x"]\n', "line 1: expected an object"),
        ('{"image": "missing.png", "prompt": "x"}\n', "none of the 1 images"),
        ("BOMB", "none of the 1 images"),
    ],
)
def test_cli_bad_data_files(capsys, tmp_path, content, message):
    data = tmp_path / "d.jsonl"
    if content == "BOMB":  # a decompression bomb (more pixels than Pillow's safety limit): skipped, not a traceback
        from PIL import Image

        Image.new("1", (20000, 20000)).save(tmp_path / "bomb.png")
        content = '{"image": "bomb.png", "prompt": "x"}\n'
    data.write_text(content)
    code = main(["optimize", "--data", str(data), "--budget", "0.25", "--trials", "1"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("vflowopt: error:")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--budget", "1.5"], "(0, 1]"),
        (["--budget", "0.25", "--data", "/no/such/file.jsonl"], "data file not found"),
        (["--budget", "0.25", "--method", "nope"], "unknown method"),
        (["--budget", "0.25", "--model", "/no/such/model"], "no hub downloads"),
    ],
)
def test_cli_bad_arguments(capsys, args, message):
    code = main(["optimize", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_bad_storage_and_mixed_study(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["optimize", "--budget", "0.25", "--trials", "1", "--samples", "1",
                 "--storage", f"sqlite:///{tmp_path / 'nowhere' / 's.db'}"])
    assert code == 2 and "cannot open study storage" in capsys.readouterr().err
    common = ["--trials", "1", "--samples", "1", "--study-name", "shared", "--json"]
    assert main(["optimize", "--budget", "0.25", *common]) == 0
    capsys.readouterr()
    assert main(["optimize", "--budget", "0.5", *common]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("vflowopt: error:") and "another budget" in last


def test_in_memory_sqlite_runs_without_a_heartbeat_traceback(tiny, samples, capfd):
    model, _ = tiny
    result = _run(model, samples, trials=2, storage="sqlite:///:memory:")
    assert result.trials_complete == 2 and "in-memory" in result.storage
    err = capfd.readouterr().err
    assert "Traceback" not in err and "no such table" not in err


def test_a_best_trial_worse_than_the_default_is_not_written_unless_asked(tiny, samples, tmp_path):
    model, _ = tiny
    # a box far from the default strategy (R1 at its lowest, the budget spent late): worse than the default
    space = space_for("vflowopt", 0.25, 6).with_bounds(R1=(0.25, 0.26), R2=(1.0, 1.0))
    out = tmp_path / "s.json"
    result = run_optimization(model, samples, 0.25, trials=2, storage=optuna.storages.InMemoryStorage(),
                              progress=False, space=space, out=out, n_startup_trials=2)
    assert result.value < result.default_value  # deterministic on the tiny model and these samples
    assert result.written == "default"
    assert vflowopt.load_config(out).to_dict() == result.default_config.to_dict() == result.config.to_dict()
    kept = run_optimization(model, samples, 0.25, trials=2, storage=optuna.storages.InMemoryStorage(),
                            progress=False, space=space, out=out, n_startup_trials=2, keep_best=True)
    assert kept.written == "best" and kept.config.retention[0] <= 0.26
    assert vflowopt.load_config(out).retention == kept.config.retention
