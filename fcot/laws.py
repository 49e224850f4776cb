"""Scaling laws: accuracy against one numeric swept axis (D, training questions, student parameters), fitted in
named forms, one chosen, its parameters and curve bootstrapped, and checked by extrapolation.

Rule: a curve is a list of points (x, outcomes), outcomes a seeds x questions 0/1 matrix of one method on one
task (the same questions at every point: the test split's). Two forms, as the literature draws them:

    log_linear   acc = a + b ln x                  Fine-tune-CoT's plots (roughly linear in log x); >= 2 points
    power        err = E + A x^-alpha, acc = 1 - err  a saturating power law (E the error it tends to, A >= 0,
                                                      0 < alpha <= ALPHA_MAX); >= 4 points (3 parameters)

fitted by least squares to the points' mean accuracies (power: alpha on a grid, E and A exact for each). The form
is the one with the lower leave-one-point-out error (each point predicted by the form fitted without it); power
needs 4 points for that, so with 3 the form is log_linear. Parameters and the curve get 95% percentile intervals
from BOOTSTRAP replicates that resample each point's seeds and, jointly across points, the questions, and refit
the chosen form. The extrapolation check fits the chosen form without the largest x and predicts that point
(with the same bootstrap) beside its measured mean and interval. `extrapolated` marks an x outside the fitted
range wherever a prediction is shown. Two axes that vary together get a joint law, additive in their logs
(`fit_joint`), with the same treatment.
"""

from __future__ import annotations

import numpy as np

BOOTSTRAP = 400
ALPHA_MAX = 3.0
ALPHAS = np.linspace(0.02, ALPHA_MAX, 150)  # the power law's exponent grid
MIN_POINTS = 3
NEEDS = {"log_linear": 2, "power": 3}  # points a form needs to be fitted (its parameters, at most)


def _log_linear(x: np.ndarray, y: np.ndarray) -> tuple[float, ...] | None:
    if len(set(x.tolist())) < 2:
        return None
    b, a = np.polyfit(np.log(x), y, 1)
    return float(a), float(b)


def _power(x: np.ndarray, y: np.ndarray) -> tuple[float, ...] | None:
    """(E, A, alpha) of err = E + A x^-alpha, least squares over the alpha grid (E and A exact for each alpha, all
    at once), with 0 <= E <= 1 and A >= 0."""
    if len(set(x.tolist())) < 3:
        return None
    err = 1.0 - y
    z = x[None, :] ** -ALPHAS[:, None]  # one row per alpha
    zc = z - z.mean(1, keepdims=True)
    a = (zc * (err - err.mean())).sum(1) / (zc ** 2).sum(1)
    e = err.mean() - a * z.mean(1)
    sse = (((e[:, None] + a[:, None] * z) - err) ** 2).sum(1)
    sse[(a < 0) | (e < 0) | (e > 1)] = np.inf
    i = int(np.argmin(sse))
    return None if not np.isfinite(sse[i]) else (float(e[i]), float(a[i]), float(ALPHAS[i]))


FORMS = {"log_linear": _log_linear, "power": _power}
PARAMETERS = {"log_linear": ("a", "b"), "power": ("E", "A", "alpha")}


def predict(form: str, params, x) -> np.ndarray:
    """The form's accuracy at x (unbounded: a log-linear law passes 1 somewhere; `accuracy` clips what is shown)."""
    x = np.asarray(x, dtype=float)
    if form == "log_linear":
        return params[0] + params[1] * np.log(x)
    return 1.0 - (params[0] + params[1] * x ** -params[2])


def accuracy(values) -> list[float]:
    """Predicted accuracies as shown: within [0, 1]."""
    return np.clip(np.asarray(values, dtype=float), 0.0, 1.0).tolist()


def loo_error(form: str, x: np.ndarray, y: np.ndarray) -> float | None:
    """Root mean squared error of each point predicted by `form` fitted without it (None: too few points)."""
    if len(x) - 1 < NEEDS[form] or (form == "power" and len(x) < 4):
        return None
    errors = []
    for i in range(len(x)):
        keep = np.arange(len(x)) != i
        params = FORMS[form](x[keep], y[keep])
        if params is None:
            return None
        errors.append(float(predict(form, params, x[i]) - y[i]))
    return float(np.sqrt(np.mean(np.square(errors))))


def _means(points: list[tuple[float, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    return np.array([x for x, _ in points], float), np.array([m.mean() for _, m in points], float)


def _replicates(points: list[tuple[float, np.ndarray]], rng: np.random.Generator, n: int) -> np.ndarray:
    """n bootstrap replicates of the points' mean accuracies: each point's seeds resampled, the questions resampled
    once per replicate for every point (they are the same questions)."""
    questions = min(m.shape[1] for _, m in points)
    out = np.empty((n, len(points)))
    for r in range(n):
        q = rng.integers(0, questions, questions)
        for j, (_, m) in enumerate(points):
            s = rng.integers(0, m.shape[0], m.shape[0])
            out[r, j] = m[np.ix_(s, q)].mean()
    return out


def fit(points: list[tuple[float, np.ndarray]], seed: int = 0, grid: int = 50) -> dict | None:
    """The law of one curve (see the module doc); None with fewer than MIN_POINTS distinct x. `grid` points of
    the fitted curve and its band span the measured range (log-spaced)."""
    points = sorted(((float(x), np.asarray(m, float)) for x, m in points), key=lambda p: p[0])
    if len({x for x, _ in points}) < MIN_POINTS or any(x <= 0 for x, _ in points):
        return None
    x, y = _means(points)
    loo = {form: loo_error(form, x, y) for form in FORMS}
    fitted = {f: FORMS[f](x, y) for f in FORMS}
    candidates = [f for f in FORMS if loo[f] is not None and fitted[f] is not None]
    form = min(candidates, key=loo.get) if candidates else "log_linear"
    params = fitted[form]
    rng = np.random.default_rng(seed)
    reps = _replicates(points, rng, BOOTSTRAP)
    fits = [p for p in (FORMS[form](x, r) for r in reps) if p is not None]
    curve_x = np.geomspace(x[0], x[-1], grid)
    curves = np.array([predict(form, p, curve_x) for p in fits])
    table = np.array(fits)
    law = {"form": form, "loo_rmse": loo, "points": len(x), "x_range": [x[0], x[-1]],
           "parameters": {name: {"value": params[i], "ci": np.percentile(table[:, i], [2.5, 97.5]).tolist()}
                          for i, name in enumerate(PARAMETERS[form])},
           "rmse": float(np.sqrt(np.mean((predict(form, params, x) - y) ** 2))),
           "curve": {"x": curve_x.tolist(), "y": accuracy(predict(form, params, curve_x)),
                     "lo": accuracy(np.percentile(curves, 2.5, 0)), "hi": accuracy(np.percentile(curves, 97.5, 0))},
           "check": _extrapolation(form, points, reps)}
    return law


def _extrapolation(form: str, points: list, reps: np.ndarray) -> dict | None:
    """The chosen form fitted without the largest x predicts it (bootstrap interval), beside its measured mean and
    interval (from the same replicates). The form falls back to log_linear where too few points are left."""
    x, y = _means(points)
    head = len(x) - 1
    if head < NEEDS[form]:
        form = "log_linear"
    params = FORMS[form](x[:head], y[:head])
    if params is None:
        return None
    predicted = [float(predict(form, p, x[-1])) for p in (FORMS[form](x[:head], r[:head]) for r in reps)
                 if p is not None]
    return {"x": float(x[-1]), "form": form, "extrapolated": True,
            "predicted": float(np.clip(predict(form, params, x[-1]), 0.0, 1.0)),
            "predicted_ci": accuracy(np.percentile(predicted, [2.5, 97.5])),
            "measured": float(y[-1]), "measured_ci": np.percentile(reps[:, -1], [2.5, 97.5]).tolist()}


def forecast(points: list[tuple[float, np.ndarray]], law: dict, xs, seed: int = 0) -> list[dict]:
    """`law` (fit(points)) at each of `xs`: its accuracy and 95% interval from the same bootstrap replicates as
    its parameters', each marked `extrapolated` outside the fitted range."""
    points = sorted(((float(x), np.asarray(m, float)) for x, m in points), key=lambda p: p[0])
    x, y = _means(points)
    form, xs = law["form"], np.asarray(xs, dtype=float)
    reps = _replicates(points, np.random.default_rng(seed), BOOTSTRAP)
    curves = np.array([predict(form, p, xs) for p in (FORMS[form](x, r) for r in reps) if p is not None])
    mean, lo, hi = (accuracy(v) for v in (predict(form, FORMS[form](x, y), xs), *np.percentile(curves, [2.5, 97.5], 0)))
    return [{"x": float(v), "predicted": mean[i], "predicted_ci": [lo[i], hi[i]], "extrapolated": extrapolated(law, v)}
            for i, v in enumerate(xs)]


JOINT = ("a", "b", "c")  # acc = a + b ln x + c ln y: two axes, additive in their logs


def _joint(xy: np.ndarray, y: np.ndarray) -> tuple[float, ...] | None:
    design = np.column_stack([np.ones(len(xy)), np.log(xy)])
    if len(xy) < 3 or np.linalg.matrix_rank(design) < 3:
        return None
    return tuple(float(v) for v in np.linalg.lstsq(design, y, rcond=None)[0])


def _joint_predict(params, xy) -> np.ndarray:
    xy = np.atleast_2d(np.asarray(xy, dtype=float))
    return params[0] + params[1] * np.log(xy[:, 0]) + params[2] * np.log(xy[:, 1])


def _joint_curves(params, table: np.ndarray, xy: np.ndarray, grid: int = 40) -> dict:
    """The joint law along each axis at every measured value of the other (its band from the bootstrap table):
    {"x": {str(y): curve}, "y": {str(x): curve}}, each curve over its axis' measured range, as fit()'s."""
    out = {}
    for side, axis in (("x", 0), ("y", 1)):
        along = np.geomspace(xy[:, axis].min(), xy[:, axis].max(), grid)
        out[side] = {}
        for other in sorted(set(xy[:, 1 - axis].tolist())):
            pts = np.column_stack([along, np.full(grid, other)])[:, [0, 1] if axis == 0 else [1, 0]]
            band = np.array([_joint_predict(p, pts) for p in table])
            out[side][f"{other:g}"] = {"x": along.tolist(), "y": accuracy(_joint_predict(params, pts)),
                                       "lo": accuracy(np.percentile(band, 2.5, 0)),
                                       "hi": accuracy(np.percentile(band, 97.5, 0))}
    return out


def fit_joint(points: list[tuple[tuple[float, float], np.ndarray]], seed: int = 0) -> dict | None:
    """The law of two axes that vary together (data size x D, student x data): acc = a + b ln x + c ln y, fitted by
    least squares to the points' mean accuracies, with the one-axis laws' treatment: leave-one-point-out error,
    95% intervals from the same bootstrap over seeds and questions, and the check (the law fitted without the
    largest point, by x * y, predicting it). None without 4 points spanning both axes."""
    points = sorted((((float(a), float(b)), np.asarray(m, float)) for (a, b), m in points),
                    key=lambda p: p[0][0] * p[0][1])
    xy = np.array([p[0] for p in points])
    if len(points) < 4 or (xy <= 0).any() or _joint(xy, np.zeros(len(xy))) is None:
        return None
    y = np.array([m.mean() for _, m in points])
    params = _joint(xy, y)
    loo = [float(_joint_predict(p, xy[i])[0] - y[i]) for i in range(len(y))
           if (p := _joint(np.delete(xy, i, 0), np.delete(y, i))) is not None]
    reps = _replicates(points, np.random.default_rng(seed), BOOTSTRAP)
    table = np.array([p for p in (_joint(xy, r) for r in reps) if p is not None])
    head = _joint(xy[:-1], y[:-1])
    check = None
    if head is not None:
        predicted = [float(_joint_predict(p, xy[-1])[0]) for p in (_joint(xy[:-1], r[:-1]) for r in reps)
                     if p is not None]
        check = {"x": xy[-1].tolist(), "extrapolated": True,
                 "predicted": float(np.clip(_joint_predict(head, xy[-1])[0], 0.0, 1.0)),
                 "predicted_ci": accuracy(np.percentile(predicted, [2.5, 97.5])), "measured": float(y[-1]),
                 "measured_ci": np.percentile(reps[:, -1], [2.5, 97.5]).tolist()}
    return {"form": "joint_log_linear", "points": len(y), "x_range": [xy[:, 0].min(), xy[:, 0].max()],
            "curves": _joint_curves(params, table, xy),
            "y_range": [xy[:, 1].min(), xy[:, 1].max()],
            "parameters": {name: {"value": params[i], "ci": np.percentile(table[:, i], [2.5, 97.5]).tolist()}
                           for i, name in enumerate(JOINT)},
            "rmse": float(np.sqrt(np.mean((_joint_predict(params, xy) - y) ** 2))),
            "loo_rmse": float(np.sqrt(np.mean(np.square(loo)))) if len(loo) == len(y) else None, "check": check}


def extrapolated(law: dict, x: float) -> bool:
    """Whether `x` lies outside the range the law was fitted on."""
    lo, hi = law["x_range"]
    return not lo <= x <= hi
