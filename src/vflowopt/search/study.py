"""The Optuna study behind `vflowopt.optimize`: storage, sampler, resume, and picking the best strategy.

Sampler. Optuna's GPSampler (Gaussian process, Matérn-5/2 kernel; log expected improvement, which
becomes log *constrained* EI once trials carry constraint values). The first `n_startup_trials`
points (Algorithm 1, step 3) are a scrambled Sobol sequence over the box, indexed by trial number:
uniform, seeded and continued (not restarted) when a study is resumed. GPSampler is rebuilt before
each trial with a seed derived from (seed, trial number), so a run interrupted and resumed proposes
the same points as an uninterrupted one.

Infeasible points. A point whose solved R3 (or, for another method, whatever its space checks) falls
outside its range is NOT clipped and NOT evaluated. The trial completes with
`trial.set_constraint("budget", violation)` (> 0 = infeasible; feasible trials record their margin
<= 0) and user attr `feasible=False`, so GPSampler fits a second GP to the constraint and multiplies
EI by the probability of feasibility. Its objective value is a penalty: the worst feasible objective
seen so far (or the default strategy's, before any), which keeps the objective GP on the scale of real
strategies. We complete rather than prune such trials because GPSampler only learns from COMPLETE
trials: pruned ones would be invisible to it and it would keep proposing them. Infeasible trials
cost no forward pass. The best strategy is chosen only among feasible trials, re-checked from their
parameters, so a penalty value can never win.

Resume. `trials` is the total number of COMPLETE trials wanted in the study (feasible or not). A run
loads the study from its storage, counts the COMPLETE trials and runs only the missing ones; each
trial is committed when it finishes, so Ctrl-C or a kill loses at most the trial in flight. A trial
left RUNNING by a kill is ignored (never counted); with a database URL the storage keeps heartbeats
and marks such trials FAIL once they are stale (`STALE_AFTER_S`). The study records the model,
budget, method, samples and search box in its user attrs and refuses to mix in another.

Several processes on one storage. Each trial is tagged with its process (host:pid). A run counts the
COMPLETE trials plus the RUNNING ones of live processes; when these reach `trials` it waits for them
instead of starting another, and a trial that finds the total already claimed by lower-numbered
trials (two processes asked at the same instant) gives itself up (PRUNED). So the study ends with
exactly `trials` COMPLETE trials however many processes share it. A RUNNING trial of a process that is
gone (same host, pid not alive) does not count; on another host, the database heartbeat decides.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import socket
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from ..config import ConfigError, PruneConfig, config_for
from ..errors import PruningError
from ..version import __version__
from .objective import Evaluation, Objective, model_fingerprint, samples_fingerprint
from .space import SearchSpace, space_for

__all__ = [
    "DEFAULT_SAMPLES",
    "DEFAULT_STARTUP_TRIALS",
    "DEFAULT_STORAGE_FILE",
    "DEFAULT_TRIALS",
    "OptimizeResult",
    "default_study_name",
    "open_storage",
    "run_optimization",
]

DEFAULT_TRIALS = 50  # paper 4.1
DEFAULT_SAMPLES = 30  # paper 4.1
DEFAULT_STARTUP_TRIALS = 10
DEFAULT_STORAGE_FILE = "vflowopt-study.db"
HEARTBEAT_S = 30
_CREATION_RACE = ("already exists", "database is locked", "UNIQUE constraint failed")
STALE_AFTER_S = 120
_ATTR_PREFIX = "vflowopt:"
_CHECKED_ATTRS = ("method", "model_family", "num_layers", "model_class", "model_fingerprint", "budget",
                  "n_samples", "samples_fingerprint", "space")


@dataclass
class OptimizeResult:
    """Everything a run learned; `optimize()` returns only `config`."""

    # the strategy returned (and written to `out`), resolved against the model: the best trial's, or the
    # method's default strategy when the best trial scored below it (unless keep_best), see `written`
    config: PruneConfig
    value: float  # the best trial's objective: Σ cos over the samples (n_samples at most)
    # the method's default for the budget, e.g. VFlowOptConfig(budget=B), resolved; None (and
    # default_value None) when the default cannot meet the budget on this model but points of the box can
    default_config: PruneConfig | None
    default_value: float | None
    n_samples: int
    study_name: str
    storage: str
    best_trial: int
    trials_complete: int
    trials_feasible: int
    trials_new: int  # run by this call
    trials_running_ignored: int
    space: SearchSpace | None  # None: the method has nothing to tune (its default was evaluated)
    history: list[tuple[int, float, bool]] = field(default_factory=list)  # (trial, value, feasible)
    nan_trials: int = 0
    study: Any = None
    written: str = "best"  # "best" (the best trial's strategy) or "default" (it scored below the default)
    mean_retention: float | None = None  # measured mean retention of `config` on the samples
    default_retention: float | None = None
    default_refused: str | None = None  # why the method's default strategy could not run here


# ---------------------------------------------------------------------------------------------------
# Storage and study
# ---------------------------------------------------------------------------------------------------


def default_study_name(method: str, budget: float) -> str:
    return f"{method}-budget{budget:g}"


def default_storage(out: str | os.PathLike | None = None) -> str:
    """`vflowopt-study.db` next to `out`, else in the current directory."""
    folder = Path(out).expanduser().resolve().parent if out is not None else Path.cwd()
    return f"sqlite:///{folder / DEFAULT_STORAGE_FILE}"


def open_storage(storage):
    """An Optuna storage from a URL (any SQLAlchemy URL Optuna accepts), a file path (SQLite), or an
    Optuna storage object; returns (storage, printable name). Failures are one-line ConfigErrors."""
    import optuna

    if isinstance(storage, optuna.storages.BaseStorage):
        return storage, type(storage).__name__
    text = os.fspath(storage)
    if "://" not in text:
        path = Path(text).expanduser().resolve()
        text = f"sqlite:///{path}"
    if text in ("sqlite://", "sqlite:///:memory:"):
        # An in-memory SQLite database exists per connection, so the heartbeat thread's connection would
        # see no tables (a traceback in that thread): keep such a study in Optuna's in-memory storage,
        # which is what the URL asks for (nothing persists, nothing to resume).
        return optuna.storages.InMemoryStorage(), f"{text} (in-memory, not resumable)"
    if text.startswith("sqlite:///"):
        db = Path(text[len("sqlite:///"):])
        if str(db) != "" and not db.parent.is_dir():
            raise ConfigError(f"cannot open study storage {text}: folder {db.parent} does not exist")
    for attempt in range(20):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opened = optuna.storages.RDBStorage(
                    text, heartbeat_interval=HEARTBEAT_S, grace_period=STALE_AFTER_S,
                    engine_kwargs={"pool_pre_ping": True} if not text.startswith("sqlite") else None,
                )
            return opened, text
        except Exception as exc:  # noqa: BLE001 - any driver/URL failure becomes one clear line
            # Two processes creating the same new database at once: one of them finds the tables
            # half-made ("already exists", "locked"); the schema is complete a moment later.
            if attempt < 19 and any(s in str(exc) for s in _CREATION_RACE):
                time.sleep(0.1)
                continue
            raise ConfigError(f"cannot open study storage {text}: {_one_line(exc)}") from None
    raise AssertionError("unreachable")  # pragma: no cover


def _one_line(exc: BaseException) -> str:
    lines = [s.strip() for s in str(exc).strip().splitlines() if s.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _open_study(storage, study_name: str, expected: dict[str, Any], storage_name: str):
    import optuna

    try:
        study = optuna.create_study(storage=storage, study_name=study_name, direction="maximize",
                                    load_if_exists=True)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"cannot open study '{study_name}' in {storage_name}: {_one_line(exc)}") from None
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise ConfigError(f"study '{study_name}' in {storage_name} minimizes; it was not made by vflowopt")
    attrs = {k[len(_ATTR_PREFIX):]: v for k, v in study.user_attrs.items() if k.startswith(_ATTR_PREFIX)}
    for _ in range(100):  # another process is creating this study right now: its attrs are being written
        if not attrs or all(key in attrs for key in _CHECKED_ATTRS):
            break
        time.sleep(0.05)
        attrs = {k[len(_ATTR_PREFIX):]: v for k, v in study.user_attrs.items() if k.startswith(_ATTR_PREFIX)}
    if not attrs:
        if study.get_trials(deepcopy=False):
            raise ConfigError(
                f"study '{study_name}' in {storage_name} has trials but was not made by vflowopt optimize; "
                "use another study name or storage"
            )
        for key, value in expected.items():
            study.set_user_attr(_ATTR_PREFIX + key, value)
        return study
    for key in _CHECKED_ATTRS:
        have, want = attrs.get(key), expected[key]
        same = math.isclose(have, want, abs_tol=1e-12) if key == "budget" and have is not None else have == want
        if not same:
            raise ConfigError(
                f"study '{study_name}' in {storage_name} was created for {key}={_show(have)}, this run has "
                f"{key}={_show(want)} ({_what_differs(attrs, expected)}); a study mixes trials of one model, "
                "budget, method and sample set only: use another --study-name or --storage"
            )
    return study


def _show(value) -> str:
    return ", ".join(f"{k} {v[0]:g}-{v[1]:g}" for k, v in value.items()) if isinstance(value, dict) else repr(value)


def _what_differs(have: dict, want: dict) -> str:
    for key, label in (("model_family", "another model"), ("num_layers", "another model"),
                       ("model_fingerprint", "another model or checkpoint"), ("budget", "another budget"),
                       ("method", "another method"), ("samples_fingerprint", "other samples"),
                       ("space", "another search space")):
        if have.get(key) != want.get(key):
            return f"made for {label}"
    return "made for another set-up"


# ---------------------------------------------------------------------------------------------------
# Sampler
# ---------------------------------------------------------------------------------------------------


def _seed_for(seed: int, number: int) -> int:
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(number)]).generate_state(1)[0])


class _SobolStartup:
    """Optuna sampler for the startup points: point `index` of a scrambled Sobol sequence over the space
    (uniform, seeded, and continued rather than restarted when a study is resumed). The index is the
    number of COMPLETE trials before this one, not Optuna's trial number, so a trial that a kill left
    RUNNING (later FAIL) does not consume a point: an interrupted run proposes what an uninterrupted one
    would have."""

    def __init__(self, space: SearchSpace, seed: int, index: int):
        import optuna

        self._base = optuna.samplers.BaseSampler
        self.space = space
        self.seed = int(seed)
        self._index = {d.name: i for i, d in enumerate(space.dims)}
        self._points = np.zeros((0, len(space.dims)))
        self._fallback = optuna.samplers.RandomSampler(seed=seed)
        self.index = int(index)

    def _point(self, n: int) -> np.ndarray:
        if n >= len(self._points):
            from scipy.stats import qmc

            m = max(1, math.ceil(math.log2(n + 1)))
            self._points = qmc.Sobol(d=len(self.space.dims), scramble=True, seed=self.seed).random_base2(m)
        return self._points[n]

    def sample(self, study, trial, name: str, dist) -> Any:
        import optuna

        if name not in self._index or dist.single():
            return self._fallback.sample_independent(study, trial, name, dist)
        u = float(self._point(self.index)[self._index[name]])
        log = getattr(dist, "log", False)
        if log:
            value = math.exp(math.log(dist.low) + u * (math.log(dist.high) - math.log(dist.low)))
        else:
            value = dist.low + u * (dist.high - dist.low)
        value = min(max(value, dist.low), dist.high)
        if isinstance(dist, optuna.distributions.IntDistribution):
            return int(min(max(round(value), dist.low), dist.high))
        return float(value)


def _make_sampler(space: SearchSpace, seed: int, number: int, n_startup: int):
    import optuna

    startup = _SobolStartup(space, seed, number)

    class SobolStartupSampler(optuna.samplers.BaseSampler):
        def infer_relative_search_space(self, study, trial):
            return {}

        def sample_relative(self, study, trial, search_space):
            return {}

        def sample_independent(self, study, trial, param_name, param_distribution):
            return startup.sample(study, trial, param_name, param_distribution)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return optuna.samplers.GPSampler(
            seed=_seed_for(seed, number), independent_sampler=SobolStartupSampler(),
            n_startup_trials=n_startup, warn_independent_sampling=False,
        )


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------


def _feasible_value(trial, space: SearchSpace) -> float | None:
    """The objective of a COMPLETE trial if it is a feasible strategy of this space, else None."""
    if trial.user_attrs.get("feasible") is not True or trial.value is None or not math.isfinite(trial.value):
        return None
    if any(c > 0 for c in trial.constraints.values()):
        return None
    if not set(space.names) <= set(trial.params):
        return None
    if not space.candidate(trial.params).feasible:  # never trust stored attrs alone
        return None
    return float(trial.value)


def _complete(study) -> list:
    import optuna

    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def _resolve(config: PruneConfig, adapter) -> PruneConfig:
    if hasattr(config, "resolve"):
        return config.resolve(adapter)
    return dataclasses.replace(config, model_family=adapter.family, num_layers=adapter.num_llm_layers)


def _grid_side(adapter) -> int | None:
    try:
        vision = adapter.config.vision_config
        return int(vision.image_size) // int(vision.patch_size)
    except (AttributeError, TypeError, ValueError):
        return None


def run_optimization(
    model: nn.Module,
    samples: Sequence[Mapping],
    budget: float,
    *,
    trials: int = DEFAULT_TRIALS,
    seed: int = 0,
    storage=None,
    method: str = "vflowopt",
    study_name: str | None = None,
    base: PruneConfig | None = None,
    space: SearchSpace | None = None,
    n_startup_trials: int = DEFAULT_STARTUP_TRIALS,
    progress: bool = True,
    out: str | os.PathLike | None = None,
    callbacks: Sequence[Callable] = (),
    cache_references: bool = True,
    keep_best: bool = False,
    objective: Objective | None = None,
    tune: bool = True,
    progress_label: str | None = None,
) -> OptimizeResult:
    """`optimize` of one method with the whole story returned (the CLI prints it); see `optimize`.

    objective: an `Objective` on these samples to share (its unpruned references are computed once,
    e.g. across the methods of `vflowopt.search.ranking`). tune=False evaluates the method's default
    strategy only (a method with nothing to tune), recorded in the study like any other."""
    import optuna

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our progress bar and summary replace its log lines
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
            return _run(model, samples, budget, trials=trials, seed=seed, storage=storage, method=method,
                        study_name=study_name, base=base, space=space, n_startup_trials=n_startup_trials,
                        progress=progress, out=out, callbacks=callbacks, cache_references=cache_references,
                        keep_best=keep_best, objective=objective, tune=tune, progress_label=progress_label)
    finally:
        optuna.logging.set_verbosity(verbosity)


def check_trials(trials, n_startup_trials) -> None:
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise ConfigError(f"trials must be a whole number >= 1, got {trials!r}")
    if not isinstance(n_startup_trials, int) or isinstance(n_startup_trials, bool) or n_startup_trials < 0:
        raise ConfigError(f"n_startup_trials must be a whole number >= 0, got {n_startup_trials!r}")


def _run(model, samples, budget, *, trials, seed, storage, method, study_name, base, space, n_startup_trials,
         progress, out, callbacks, cache_references, keep_best=False, objective=None, tune=True,
         progress_label=None) -> OptimizeResult:
    import optuna

    from ..models.base import adapter_for

    check_trials(trials, n_startup_trials)
    base = base if base is not None else config_for(method, budget=budget)
    if base.method != method:
        raise ConfigError(f"base config is for method '{base.method}', not '{method}'")
    base = dataclasses.replace(base, budget=budget)
    base.validate()  # budget in (0, 1]
    adapter = adapter_for(model)
    n_layers = adapter.num_llm_layers
    if not tune:
        space = None
    elif space is None:
        space = space_for(method, budget, n_layers, base=base, grid_side=_grid_side(adapter))
    elif space.method != method or not math.isclose(space.budget, budget):
        raise ConfigError(f"the search space is for {space.method} at budget {space.budget}, not {method} at {budget}")
    if objective is None:
        objective = Objective(model, samples, cache_references=cache_references)
    elif objective.model is not model:
        raise ConfigError("the shared objective was built for another model")

    # The method's default strategy: the comparison point, the penalty floor, and a check that the
    # method runs on these samples. A budget below 1/n is realised as one token per image and stage
    # (budget.keep_count), the same rule as prune(), so no budget in (0, 1] is refused here.
    # A tuned method whose default cannot meet the budget on this model (e.g. FastV's K = 2 at a budget
    # below 2/L) is still searched: points of its box can; the default then takes no part.
    default_config, default_refused = None, None
    try:
        default_config = _resolve(config_for(method, budget=budget), adapter)
    except ConfigError as exc:
        if space is None:
            raise
        default_refused = _one_line(exc)
    storage_obj, storage_name = open_storage(storage if storage is not None else default_storage(out))
    study_name = study_name or default_study_name(method, budget)
    expected = {
        "method": method, "model_family": adapter.family, "num_layers": n_layers,
        "model_class": type(model).__name__, "model_fingerprint": model_fingerprint(model),
        "budget": float(budget), "n_samples": len(objective), "samples_fingerprint": samples_fingerprint(
            objective.samples), "space": space.summary() if space is not None else "none",
    }
    study = _open_study(storage_obj, study_name, expected, storage_name)
    default_value = study.user_attrs.get(_ATTR_PREFIX + "default_value")
    default_retention = study.user_attrs.get(_ATTR_PREFIX + "default_retention")
    if default_config is None:
        default_value = default_retention = None
    elif default_value is None or default_retention is None:
        try:
            default_eval = objective.evaluate(default_config)
        except (ConfigError, PruningError) as exc:  # prune() refused it on these samples
            if space is None:
                raise
            default_config, default_refused = None, _one_line(exc)
        else:
            default_value, default_retention = default_eval.value, default_eval.mean_retention
            study.set_user_attr(_ATTR_PREFIX + "default_value", default_value)
            study.set_user_attr(_ATTR_PREFIX + "default_retention", default_retention)
        study.set_user_attr(_ATTR_PREFIX + "seed", int(seed))
        study.set_user_attr(_ATTR_PREFIX + "version", __version__)
    if space is None:  # nothing to tune: the default strategy is the answer
        if out is not None:
            default_config.save(out)
        return OptimizeResult(
            config=default_config, value=float(default_value), default_config=default_config,
            default_value=float(default_value), n_samples=len(objective), study_name=study_name,
            storage=storage_name, best_trial=-1, trials_complete=0, trials_feasible=0, trials_new=0,
            trials_running_ignored=0, space=None, study=study, written="default",
            mean_retention=float(default_retention), default_retention=float(default_retention),
        )
    optuna.storages.fail_stale_trials(study)

    nan_trials = 0
    owner = _owner_tag()

    def penalty() -> float:
        values = [v for t in _complete(study) if (v := _feasible_value(t, space)) is not None]
        floor = [] if default_value is None else [float(default_value)]
        return min([*floor, *values]) if floor or values else 0.0

    def objective_fn(trial) -> float:
        nonlocal nan_trials
        trial.set_user_attr(_OWNER_ATTR, owner)
        if _claims_before(study, trial.number) >= trials:
            # Another process on this storage took the last trial(s) between our check and this trial's
            # creation: give this one up so that the study ends with exactly `trials` COMPLETE trials.
            raise optuna.TrialPruned("surplus: the study's trial total was reached by another process")
        params = space.suggest(trial)
        cand = space.candidate(params)
        trial.set_constraint("budget", cand.violation)
        trial.set_user_attr("feasible", cand.feasible)
        for key, value in cand.info.items():
            trial.set_user_attr(key, _jsonable(value))
        if not cand.feasible:
            return penalty()
        config = dataclasses.replace(base, **cand.fields)
        ev: Evaluation = objective.evaluate(config)
        if ev.nan_samples:
            nan_trials += 1
        trial.set_user_attr("evaluation", {  # one attr: one storage commit
            "mean_retention": ev.mean_retention, "seconds": round(ev.seconds, 4),
            "min_cosine": min(ev.cosines), "nan_samples": ev.nan_samples,
        })
        return ev.value

    def best_so_far() -> tuple[float | None, int | None]:
        best, number = None, None
        for t in _complete(study):
            v = _feasible_value(t, space)
            if v is not None and (best is None or v > best):
                best, number = v, t.number
        return best, number

    done_at_start = len(_complete(study))
    n_new = 0
    with _Progress(progress, total=trials, done=done_at_start, best=best_so_far()[0], label=progress_label) as bar:
        while True:
            complete = len(_complete(study))
            if complete >= trials:
                break
            if complete + len(_live_running(study)) >= trials:
                # Trials running in other live processes will reach the total: wait for them rather than
                # overshoot (a killed process's trial stops counting once its owner is gone).
                time.sleep(_WAIT_S)
                optuna.storages.fail_stale_trials(study)
                continue
            number = complete  # the sequence index: COMPLETE trials only (see _SobolStartup)
            study.sampler = _make_sampler(space, seed, number, n_startup_trials)
            study.optimize(objective_fn, n_trials=1, callbacks=list(callbacks), gc_after_trial=False)
            n_new += 1
            bar.update(len(_complete(study)), best_so_far()[0])

    best_value, best_number = best_so_far()
    complete = _complete(study)
    if best_number is None:
        raise ConfigError(
            f"none of the {len(complete)} complete trials of study '{study_name}' is a feasible strategy "
            f"(search box: {space.describe()}); widen the box or run more trials"
        )
    best_trial = next(t for t in complete if t.number == best_number)
    config = _resolve(dataclasses.replace(base, **space.candidate(best_trial.params).fields), adapter)
    retention = (best_trial.user_attrs.get("evaluation") or {}).get("mean_retention")
    written = "best"
    # never hand back a strategy worse than the default
    if default_value is not None and best_value < default_value and not keep_best:
        config, written, retention = default_config, "default", default_retention
    if out is not None:
        config.save(out)
    history = [(t.number, float(t.value), _feasible_value(t, space) is not None) for t in complete]
    live = {t.number for t in _live_running(study)}
    running = sum(1 for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
                  if t.number not in live)
    return OptimizeResult(
        config=config, value=float(best_value), default_config=default_config, default_value=default_value,
        n_samples=len(objective), study_name=study_name, storage=storage_name, best_trial=best_number,
        trials_complete=len(complete), trials_feasible=sum(1 for h in history if h[2]), trials_new=n_new,
        trials_running_ignored=running, space=space, history=history, nan_trials=nan_trials, study=study,
        written=written, mean_retention=None if retention is None else float(retention),
        default_retention=default_retention, default_refused=default_refused,
    )


# ---------------------------------------------------------------------------------------------------
# Several processes on one storage: the trial total holds
# ---------------------------------------------------------------------------------------------------

_OWNER_ATTR = "vflowopt_owner"
_WAIT_S = 0.5
# A RUNNING trial that no process has tagged yet is one being created right now (the tag is its first
# write, milliseconds after creation) or the leftover of a process killed in that instant; after this
# long it is taken for the latter.
UNTAGGED_GRACE_S = 10.0


def _owner_tag() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _is_live(trial) -> bool:
    """Whether a RUNNING trial belongs to a process that may still complete it."""
    owner = trial.user_attrs.get(_OWNER_ATTR)
    if not isinstance(owner, str):
        start = trial.datetime_start
        if start is None:
            return True
        now = datetime.datetime.now(start.tzinfo) if start.tzinfo else datetime.datetime.now()
        return (now - start).total_seconds() < UNTAGGED_GRACE_S
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True  # another machine: its heartbeat (database storages) decides when it is stale
    return _pid_alive(int(pid))


def _live_running(study) -> list:
    import optuna

    return [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)) if _is_live(t)]


def _claims_before(study, number: int) -> int:
    """COMPLETE trials plus live RUNNING ones numbered before `number`: the trials that come first."""
    import optuna

    n = 0
    for t in study.get_trials(deepcopy=False):
        if t.number >= number:
            continue
        if t.state == optuna.trial.TrialState.COMPLETE or (t.state == optuna.trial.TrialState.RUNNING and _is_live(t)):
            n += 1
    return n


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


class _Progress:
    """The trial bar on stderr (vflowopt.progress rule: only on a terminal): done/total, best so far, time left."""

    def __init__(self, enabled: bool, total: int, done: int, best: float | None, label: str | None = None):
        from ..progress import ProgressBar

        self.best = best
        self._bar = ProgressBar(total, label or "trial", enabled=enabled, done=done, fields={"best": self._best()})
        self.enabled = self._bar.enabled

    def _best(self) -> str:
        return "best -" if self.best is None else f"best {self.best:.4f}"

    def __enter__(self):
        self._bar.__enter__()
        return self

    def update(self, done: int, best: float | None) -> None:
        self.best = best
        self._bar.update(completed=done, best=self._best())

    def __exit__(self, *exc) -> None:
        self._bar.__exit__(*exc)

