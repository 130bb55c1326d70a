"""Per-dataset hyperparameter search (Optuna) over the official GRU4Rec parameter space.

Only the training data comes in: a time-based validation split is carved from it (the latest-ending
sessions), so whatever is held out as test stays unseen. Every trial trains on the earlier part with one
fixed seed and is scored by MRR@20 on the later part (Recall@20 kept beside it), after every epoch, so
the pruner can stop trials that trail the others at the same epoch. The official configuration and the
shipped default run first, so the search starts from them and its best is never worse on validation.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import pandas as pd

from model.params import OFFICIAL, GRU4RecParams

OBJECTIVE_K = 20
# trials 0 and 1 (the official configuration and the shipped default) set the bar: from trial 2 on, a trial
# below the median of the trials before it at the same epoch is stopped, so a poor point costs about one epoch
PRUNE_AFTER = 2


class TuneError(ValueError):
    """A tuning request that cannot run or produced nothing usable; the message says why."""


@dataclass(frozen=True)
class TuneSettings:
    """``budget_s``: wall time after which no trial starts and a running one is stopped; ``n_trials``:
    optional cap; ``valid_fraction``: share of the latest sessions held out for validation; trials train
    with ``seed``; ``max_layers`` / ``max_epochs`` cap the space's size and length."""

    budget_s: float
    n_trials: int | None = None
    seed: int = 42
    valid_fraction: float = 0.1
    max_layers: int = 512
    max_epochs: int = 10

    def __post_init__(self) -> None:
        if not self.budget_s > 0:
            raise TuneError(f"the budget must be positive, got {self.budget_s / 60:g} minutes")
        if self.n_trials is not None and self.n_trials < 1:
            raise TuneError(f"--trials must be at least 1, got {self.n_trials}")
        if not 0.0 < self.valid_fraction < 0.5:
            raise TuneError(f"the validation fraction must be in (0, 0.5), got {self.valid_fraction}")
        if self.max_layers < 64 or self.max_epochs < 1:
            raise TuneError("the space needs max_layers >= 64 and max_epochs >= 1")


def suggest(trial: Any, settings: TuneSettings) -> GRU4RecParams:
    """One point of the space: the ranges and steps of the official paramspaces
    (GRU4Rec_PyTorch_Official ``paramspaces/*``) for both losses, plus the parameters they fix
    (n_sample, logq, constrained embedding, epochs)."""
    loss = trial.suggest_categorical("loss", ["cross-entropy", "bpr-max"])
    values: dict[str, Any] = {
        "loss": loss,
        "layers": (trial.suggest_int("layers", 64, settings.max_layers, step=32),),
        "batch_size": trial.suggest_int("batch_size", 32, 256, step=16),
        "learning_rate": _grid(trial, "learning_rate", 0.01, 0.25, 0.005),
        "dropout_p_embed": _grid(trial, "dropout_p_embed", 0.0, 0.5, 0.05),
        "dropout_p_hidden": _grid(trial, "dropout_p_hidden", 0.0, 0.7, 0.05),
        "momentum": _grid(trial, "momentum", 0.0, 0.9, 0.05),
        "n_sample": trial.suggest_categorical("n_sample", [0, 512, 2048]),
        "sample_alpha": _grid(trial, "sample_alpha", 0.0, 1.0, 0.1),
        "constrained_embedding": trial.suggest_categorical("constrained_embedding", [True, False]),
        "n_epochs": trial.suggest_int("n_epochs", 1, settings.max_epochs),
    }
    if loss == "bpr-max":
        values["bpreg"] = _grid(trial, "bpreg", 0.0, 2.0, 0.05)
        values["elu_param"] = trial.suggest_categorical("elu_param", [0.5, 1.0, 0.0])
        values["logq"] = 0.0
    else:
        values["logq"] = trial.suggest_categorical("logq", [0.0, 1.0])
        values["bpreg"], values["elu_param"] = 0.0, 0.0
    return dataclasses.replace(OFFICIAL, seed=settings.seed, **values)


def _grid(trial: Any, name: str, low: float, high: float, step: float) -> float:
    """A float on the grid low + k * step, rounded so that 0.15 is stored as 0.15, not 0.15000000000000002."""
    return round(trial.suggest_float(name, low, high, step=step), 6)


def as_trial_params(params: GRU4RecParams, settings: TuneSettings) -> dict[str, Any]:
    """A configuration in the space's own names, for ``study.enqueue_trial``."""
    d: dict[str, Any] = {k: getattr(params, k) for k in ("loss", "batch_size", "learning_rate", "dropout_p_embed",
                                                          "dropout_p_hidden", "momentum", "n_sample", "sample_alpha",
                                                          "constrained_embedding")}
    d["layers"] = params.layers[0]
    d["n_epochs"] = min(params.n_epochs, settings.max_epochs)
    if params.loss == "bpr-max":
        d.update(bpreg=params.bpreg, elu_param=float(params.elu_param))
    else:
        d["logq"] = float(params.logq)
    return d


def carve_validation(train: pd.DataFrame, fraction: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(fit part, validation part) of the training table; raises :class:`TuneError` when too small."""
    from model.data import split_latest_sessions

    fit_part, valid = split_latest_sessions(train, fraction)
    if fit_part.empty or len(valid) - valid["SessionId"].nunique() < 1:
        raise TuneError(f"the training data ({len(train)} events, {train['SessionId'].nunique()} sessions) is too "
                        f"small to hold out {fraction:.0%} of its sessions for validation with a prediction left")
    return fit_part, valid


class _OutOfTime(Exception):
    """The budget ran out inside a trial."""


@dataclass
class _Objective:
    fit_part: pd.DataFrame
    valid: pd.DataFrame
    settings: TuneSettings
    deadline: float

    def __call__(self, trial: Any) -> float:
        import optuna

        from model.evaluate import evaluate
        from model.network import GRU4RecNet
        from model.train import build_vocabulary, fit

        params = suggest(trial, self.settings)
        trial.set_user_attr("params", params.to_dict())
        vocab = build_vocabulary(self.fit_part)
        net = GRU4RecNet(len(vocab), params)
        started = time.monotonic()
        last: dict[str, float] = {}

        def after_epoch(_line: str) -> None:
            # fit() calls this once per finished epoch, with the network trained so far
            epoch = len(last.get("epochs", [])) + 1
            res = evaluate(net, vocab, self.valid, cutoffs=(OBJECTIVE_K,))
            last.update(mrr=res["mrr"][str(OBJECTIVE_K)], recall=res["recall"][str(OBJECTIVE_K)])
            last.setdefault("epochs", []).append(epoch)  # type: ignore[union-attr]
            trial.set_user_attr("recall", last["recall"])
            trial.set_user_attr("mrr", last["mrr"])
            trial.set_user_attr("epochs_run", epoch)
            trial.set_user_attr("seconds", time.monotonic() - started)
            trial.report(last["mrr"], epoch)
            if epoch < params.n_epochs and trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch}")
            if epoch < params.n_epochs and time.monotonic() > self.deadline:
                raise _OutOfTime()

        try:
            fit(net, self.fit_part, params, item_rows=vocab, progress=False, report=after_epoch)
        except _OutOfTime:
            trial.set_user_attr("stopped", "budget")
            raise optuna.TrialPruned("stopped: the budget ran out") from None
        except FloatingPointError:
            trial.set_user_attr("stopped", "diverged")
            raise optuna.TrialPruned("diverged") from None
        trial.set_user_attr("seconds", time.monotonic() - started)
        return float(last["mrr"])


@dataclass(frozen=True)
class TuneResult:
    best: GRU4RecParams
    best_trial: int
    rows: list[dict[str, Any]]  # one per trial, see :func:`trial_rows`
    about: dict[str, Any]


def tune(train: pd.DataFrame, settings: TuneSettings, report: Callable[[str], None] | None = None) -> TuneResult:
    """Search the space on ``train`` within the budget; the result's ``best`` is the best completed trial."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    fit_part, valid = carve_validation(train, settings.valid_fraction)
    started = time.monotonic()
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=settings.seed),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=PRUNE_AFTER, n_warmup_steps=0))
    for start in (OFFICIAL, GRU4RecParams()):
        study.enqueue_trial(as_trial_params(start, settings))
    say = report or (lambda _line: None)
    with warnings.catch_warnings():
        # the official 100 units lie off the space's 32-unit grid; Optuna runs them as enqueued and warns
        warnings.filterwarnings("ignore", message="Fixed parameter .* is out of range", category=UserWarning)
        study.optimize(_Objective(fit_part, valid, settings, started + settings.budget_s), n_trials=settings.n_trials,
                       timeout=settings.budget_s, callbacks=[_progress_callback(say, started, settings.budget_s)],
                       catch=())
    rows = trial_rows(study)
    done = [r for r in rows if r["state"] == "complete"]
    if not done:
        raise TuneError(f"no trial finished within {settings.budget_s / 60:g} minutes "
                        f"({len(rows)} started); give it a larger --budget-minutes")
    best = max(done, key=lambda r: (r["mrr"], r["recall"]))
    about = {"objective": f"MRR@{OBJECTIVE_K} on the validation split", "valid_fraction": settings.valid_fraction,
             "fit_events": int(len(fit_part)), "valid_events": int(len(valid)),
             "valid_predictions": int(len(valid) - valid["SessionId"].nunique()),
             "trials": len(rows), "complete": len(done), "budget_s": settings.budget_s,
             "seconds": round(time.monotonic() - started, 1), "seed": settings.seed, "best_trial": best["trial"],
             "best": {"mrr": best["mrr"], "recall": best["recall"]},
             "official": _metrics_of(rows[0]) if rows else None}
    return TuneResult(GRU4RecParams.from_dict(best["params"]), best["trial"], rows, about)


def _metrics_of(row: dict[str, Any]) -> dict[str, Any]:
    return {"state": row["state"], "mrr": row["mrr"], "recall": row["recall"]}


def _progress_callback(say: Callable[[str], None], started: float, budget_s: float) -> Callable[[Any, Any], None]:
    def callback(study: Any, trial: Any) -> None:
        attrs = trial.user_attrs
        state = trial.state.name.lower()
        what = "complete" if state == "complete" else f"{state} at epoch {attrs.get('epochs_run', 0)}"
        if attrs.get("stopped"):
            what = f"stopped ({attrs['stopped']}) at epoch {attrs.get('epochs_run', 0)}"
        try:
            best = f"best MRR@{OBJECTIVE_K} {study.best_value:.4f} (trial {study.best_trial.number})"
        except ValueError:
            best = "no complete trial yet"
        mrr, recall = attrs.get("mrr", math.nan), attrs.get("recall", math.nan)
        say(f"trial {trial.number}: MRR@{OBJECTIVE_K} {mrr:.4f} Recall@{OBJECTIVE_K} {recall:.4f} "
            f"{what} in {attrs.get('seconds', 0.0):.0f}s; {best}; "
            f"{(time.monotonic() - started) / 60:.1f}/{budget_s / 60:g} min")
    return callback


TABLE_PARAMS = ("loss", "layers", "batch_size", "learning_rate", "momentum", "dropout_p_embed", "dropout_p_hidden",
                "n_sample", "sample_alpha", "bpreg", "logq", "elu_param", "constrained_embedding", "n_epochs")


def trial_rows(study: Any) -> list[dict[str, Any]]:
    """One dict per trial: number, state, epochs run, validation MRR/Recall at the last epoch run, seconds,
    and the full parameters."""
    rows = []
    for t in study.trials:
        a = t.user_attrs
        if "params" not in a:
            continue
        state = "stopped" if a.get("stopped") else t.state.name.lower()
        rows.append({"trial": t.number, "state": state, "epochs_run": a.get("epochs_run", 0),
                     "mrr": a.get("mrr", math.nan), "recall": a.get("recall", math.nan),
                     "seconds": round(a.get("seconds", 0.0), 1), "params": a["params"]})
    return rows


def validation_table(rows: list[dict[str, Any]], best_trial: int, fmt: str = "markdown") -> str:
    """The trials as a markdown or CSV table (``fmt``), best first among the complete ones."""
    import csv
    import io

    head = ["trial", "state", "epochs_run", f"MRR@{OBJECTIVE_K}", f"Recall@{OBJECTIVE_K}", "seconds", *TABLE_PARAMS]
    ordered = sorted(rows, key=lambda r: (r["state"] != "complete", -_num(r["mrr"]), r["trial"]))
    body = []
    for r in ordered:
        p = r["params"]
        name = f"{r['trial']}*" if r["trial"] == best_trial else str(r["trial"])
        body.append([name, r["state"], r["epochs_run"], f"{r['mrr']:.4f}", f"{r['recall']:.4f}", r["seconds"],
                     *("/".join(map(str, p[k])) if k == "layers" else p[k] for k in TABLE_PARAMS)])
    if fmt == "csv":
        out = io.StringIO()
        csv.writer(out).writerows([head, *body])
        return out.getvalue()
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def _num(x: float) -> float:
    return -1.0 if math.isnan(x) else x
