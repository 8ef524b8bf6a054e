"""The step cost model: a replica's iteration time as a function of what the iteration ran.

    cost = StepCostModel()
    cost.add(rows=4, tokens=160, attn_kpairs=12.5, seconds=0.061)   # after every iteration
    cost.predict(rows=8, tokens=256, attn_kpairs=25.0)               # -> seconds
    cost.to_dict()  -> {"coef": [a, b, c, d], "samples": n, ...}      # published in EngineStats
    StepCostModel.from_dict(d).predict(...)                         # read back by the router

    iteration seconds = a + b * rows + c * tokens + d * attn_kpairs

- a: the fixed cost of an iteration (launches, the hand-over between the event loop and the
  worker thread, Python per step);
- b: per row of the step batch (its commit, its share of the page tables);
- c: per token the forwards processed (the matmuls: by far the largest term on a CPU, ~1.4 ms a
  32-token row for tiny-coder on one core);
- d: per thousand (query, key) pairs attended (queries x cached context): what grows with long
  prompts and late blocks.

It is fitted online by least squares with exponential forgetting (`forget` per sample: 0.995
weighs the last ~200 iterations, a few seconds of a busy replica, so a co-tenant or a new
batch mix is learnt in seconds) and a small ridge term that keeps the 4 x 4 system solvable
while the features are still collinear (every step so far at the same block length). A
coefficient that comes out negative is dropped and the rest refitted (an active-set pass):
a negative per-row or per-token cost would predict faster steps for bigger batches, which the
step controller would read as "load is free". Pure Python + numpy; no torch, no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FEATURES = ("iteration", "rows", "tokens", "attn_kpairs")


@dataclass
class StepCost:
    """A fitted model: seconds = coef . (1, rows, tokens, attn_kpairs)."""

    coef: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    samples: float = 0.0  # effective (forgetting-weighted) number of iterations behind the fit
    rmse_s: float = 0.0  # root mean square residual of the fit, seconds
    # standard deviation of the rows of the iterations behind it: below ~0.5 (every step at
    # one batch size, e.g. a replica that served one request at a time) the split between the
    # fixed and the per-row cost is not identified, and readers should not extrapolate it
    rows_spread: float = 0.0

    def predict(self, rows: float, tokens: float, attn_kpairs: float = 0.0) -> float:
        a, b, c, d = self.coef
        return a + b * rows + c * tokens + d * attn_kpairs

    @property
    def fitted(self) -> bool:
        return self.samples >= 4 and any(c > 0 for c in self.coef)

    def to_dict(self) -> dict:
        return {"coef": [float(c) for c in self.coef], "samples": float(self.samples),
                "rmse_s": float(self.rmse_s), "rows_spread": float(self.rows_spread)}

    @classmethod
    def from_dict(cls, d: dict | None) -> StepCost:
        if not d or "coef" not in d:
            return cls()
        coef = tuple(float(c) for c in d["coef"])
        if len(coef) != len(FEATURES):
            return cls()
        return cls(coef=coef, samples=float(d.get("samples", 0.0)),
                   rmse_s=float(d.get("rmse_s", 0.0)),
                   rows_spread=float(d.get("rows_spread", 0.0)))


class StepCostModel:
    """Online weighted least squares of iteration time on FEATURES (the module docstring)."""

    def __init__(self, forget: float = 0.995, ridge: float = 1e-6):
        if not 0.0 < forget <= 1.0:
            raise ValueError("forget must be in (0, 1]")
        self.forget = forget
        self.ridge = ridge
        n = len(FEATURES)
        self._xtx = np.zeros((n, n))
        self._xty = np.zeros(n)
        self._yty = 0.0
        self._w = 0.0  # total weight
        self._fit: StepCost | None = None

    def add(self, rows: int, tokens: int, attn_kpairs: float, seconds: float) -> None:
        x = np.array([1.0, float(rows), float(tokens), float(attn_kpairs)])
        g = self.forget
        self._xtx = g * self._xtx + np.outer(x, x)
        self._xty = g * self._xty + x * seconds
        self._yty = g * self._yty + seconds * seconds
        self._w = g * self._w + 1.0
        self._fit = None  # refitted lazily: stats() is read ~4 times a second, steps run faster

    def fit(self) -> StepCost:
        if self._fit is not None:
            return self._fit
        if self._w < 1.0:
            self._fit = StepCost()
            return self._fit
        n = len(FEATURES)
        active = list(range(n))
        coef = np.zeros(n)
        # scale the ridge to each feature's own magnitude, so it regularises rows and tokens alike
        diag = np.maximum(np.diag(self._xtx), 1e-12)
        for _ in range(n):
            idx = np.array(active)
            a = self._xtx[np.ix_(idx, idx)] + self.ridge * np.diag(diag[idx])
            sol = np.linalg.solve(a, self._xty[idx])
            if (sol >= 0).all() or len(active) == 1:
                coef = np.zeros(n)
                coef[idx] = np.maximum(sol, 0.0)
                break
            # drop the most negative coefficient (never the intercept while others remain)
            worst = int(np.argmin(np.where(idx == 0, np.inf, sol)))
            if idx[worst] == 0:
                worst = int(np.argmin(sol))
            active.pop(worst)
        # residual sum of squares from the sufficient statistics: y'y - 2 c'X'y + c'X'X c
        rss = self._yty - 2 * coef @ self._xty + coef @ self._xtx @ coef
        rmse = float(np.sqrt(max(rss, 0.0) / self._w))
        mean_rows = self._xtx[0, 1] / self._w
        spread = float(np.sqrt(max(self._xtx[1, 1] / self._w - mean_rows * mean_rows, 0.0)))
        self._fit = StepCost(coef=tuple(float(c) for c in coef), samples=self._w, rmse_s=rmse,
                             rows_spread=spread)
        return self._fit

    def predict(self, rows: float, tokens: float, attn_kpairs: float = 0.0) -> float:
        return self.fit().predict(rows, tokens, attn_kpairs)

    def to_dict(self) -> dict:
        return self.fit().to_dict()


__all__ = ["FEATURES", "StepCost", "StepCostModel"]
