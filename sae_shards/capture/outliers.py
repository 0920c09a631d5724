"""The outlier test shared by the per-step and per-event captures (``capture.outlier_ratio``)."""

from __future__ import annotations

import math

PATIENCE = 2
"""RL steps in a row whose every sample is flagged before their scale becomes the reference: a
lasting change of scale (the first reward earned after steps of weight decay alone) costs these
steps, while a lone wild step (all of a step's events together) is still left out."""


class NormOutliers:
    """Flags a sample whose norm exceeds ``ratio`` times the running RMS of the accepted norms.

    The reference is the mean of the accepted squared norms over the first 50, then an EMA of
    rate 0.02; the test starts at the 5th. An all-zero sample (a step that changed nothing)
    carries no scale and is neither tested nor part of the reference: a run whose first steps
    change nothing would otherwise have a reference of 0 and flag every later sample. A flagged
    sample leaves the reference as it was, except that after ``PATIENCE`` RL steps in a row whose
    every sample was flagged, their mean squared norm becomes the reference (a new scale, not a
    wild step). ``ratio`` 0 never flags.
    """

    def __init__(self, ratio: float) -> None:
        self.ratio = ratio
        self.sq_norm_mean = 0.0  # running mean of the accepted samples' squared norms
        self.n_norms = 0
        self.last_rms = 0.0
        """The reference RMS the last sample was tested against (for the caller's message)."""
        self.step: int | None = None  # the RL step of the samples being tested
        self.step_kept = False  # a sample of that step was accepted
        self.streak = 0  # steps in a row before it whose every sample was flagged
        self.flagged_sq = 0.0  # their flagged squared norms, summed, and how many
        self.n_flagged = 0

    @property
    def rms(self) -> float:
        return math.sqrt(self.sq_norm_mean)

    def is_outlier(self, norm: float, step: int | None = None) -> bool:
        """Whether ``norm`` (a sample of RL step ``step``; None: a step of its own) is flagged."""
        if norm == 0.0:
            return False
        if step is None or step != self.step:
            self._next_step(step)
        self.last_rms = self.rms
        if self.ratio and self.n_norms >= 4 and norm > self.ratio * self.last_rms:
            self.flagged_sq += norm * norm
            self.n_flagged += 1
            return True
        self.step_kept = True
        self.n_norms += 1
        rate = max(1.0 / self.n_norms, 0.02)
        self.sq_norm_mean += rate * (norm * norm - self.sq_norm_mean)
        return False

    def _next_step(self, step: int | None) -> None:
        """Close the step tested so far and start ``step``; after ``PATIENCE`` wholly flagged
        steps, their scale becomes the reference."""
        wholly_flagged = not self.step_kept and self.n_flagged > 0  # (none before: False)
        self.streak = self.streak + 1 if wholly_flagged else 0
        if not wholly_flagged:
            self.flagged_sq, self.n_flagged = 0.0, 0
        if self.streak >= PATIENCE:
            self.sq_norm_mean = self.flagged_sq / self.n_flagged
            self.streak, self.flagged_sq, self.n_flagged = 0, 0.0, 0
        self.step, self.step_kept = step, False

    def state(self) -> dict[str, float]:
        return {"sq_norm_mean": self.sq_norm_mean, "n_norms": self.n_norms,
                "outlier_step": -1 if self.step is None else self.step,
                "outlier_step_kept": int(self.step_kept), "outlier_streak": self.streak,
                "outlier_flagged_sq": self.flagged_sq, "outlier_n_flagged": self.n_flagged}

    def load_state(self, saved: dict[str, float]) -> None:
        """As :meth:`state` wrote it; a resume file of an earlier version holds the reference
        only (the streak starts again)."""
        self.sq_norm_mean, self.n_norms = float(saved["sq_norm_mean"]), int(saved["n_norms"])
        step = int(saved.get("outlier_step", -1))
        self.step = None if step < 0 else step
        self.step_kept = bool(saved.get("outlier_step_kept", 0))
        self.streak = int(saved.get("outlier_streak", 0))
        self.flagged_sq = float(saved.get("outlier_flagged_sq", 0.0))
        self.n_flagged = int(saved.get("outlier_n_flagged", 0))
