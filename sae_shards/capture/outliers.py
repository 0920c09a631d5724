"""The outlier test shared by the per-step and per-event captures (``capture.outlier_ratio``)."""

from __future__ import annotations

import math

PATIENCE = 3
"""RL steps in a row, each with a flagged sample, before the flagged samples' scale becomes the
reference: a lasting change of scale (the first reward earned after steps of weight decay
alone; events a hundred times larger than others of their step, step after step) costs these
steps, while a burst of wild steps shorter than this is left out."""


class NormOutliers:
    """Flags a sample whose norm exceeds ``ratio`` times the running RMS of the accepted norms.

    The reference is the mean of the accepted squared norms over the first 50, then an EMA of
    rate 0.02; the test starts at the 5th. An all-zero sample (a step that changed nothing)
    carries no scale and is neither tested nor part of the reference: a run whose first steps
    change nothing would otherwise have a reference of 0 and flag every later sample. A flagged
    sample leaves the reference as it was, except that after ``PATIENCE`` consecutive RL steps
    (``step`` numbers one apart) each with a flagged sample, the mean squared norm of those
    flagged samples becomes the reference. The trade-off: a burst of ``PATIENCE`` or more wild
    steps is taken as a new scale too, and the test stays lax while the EMA comes back down
    (about ``ln(scale ratio) / 0.01`` samples). ``ratio`` 0 never flags.
    """

    def __init__(self, ratio: float) -> None:
        self.ratio = ratio
        self.sq_norm_mean = 0.0  # running mean of the accepted samples' squared norms
        self.n_norms = 0
        self.last_rms = 0.0
        """The reference RMS the last sample was tested against (for the caller's message)."""
        self.step: int | None = None  # the RL step whose samples are being tested
        self.step_flagged = [0.0, 0]  # its flagged samples: squared norms summed, count
        self.streak = 0  # consecutive steps before it, each with a flagged sample
        self.streak_flagged = [0.0, 0]  # their flagged samples: squared norms summed, count
        self.streak_last: int | None = None  # the last step of the streak

    @property
    def rms(self) -> float:
        return math.sqrt(self.sq_norm_mean)

    def is_outlier(self, norm: float, step: int) -> bool:
        """Whether ``norm``, a sample of RL step ``step`` (one step's samples in a row), is
        flagged."""
        if norm == 0.0:
            return False
        if step != self.step:
            self._next_step(step)
        self.last_rms = self.rms
        if self.ratio and self.n_norms >= 4 and norm > self.ratio * self.last_rms:
            self.step_flagged[0] += norm * norm
            self.step_flagged[1] += 1
            return True
        self.n_norms += 1
        rate = max(1.0 / self.n_norms, 0.02)
        self.sq_norm_mean += rate * (norm * norm - self.sq_norm_mean)
        return False

    def _next_step(self, step: int) -> None:
        """Close the step tested so far (it extends the streak when a sample of it was flagged
        and it follows the streak's last step) and start ``step``; a streak of ``PATIENCE``
        steps makes its flagged samples' scale the reference."""
        closed, (total, count) = self.step, self.step_flagged
        if count:
            follows = self.streak_last is not None and closed == self.streak_last + 1
            if self.streak and follows:
                self.streak += 1
                self.streak_flagged = [self.streak_flagged[0] + total,
                                       self.streak_flagged[1] + count]
            else:
                self.streak, self.streak_flagged = 1, [total, count]
            self.streak_last = closed
        else:  # a step whose every sample passed (or none before): the streak is over
            self.streak, self.streak_flagged, self.streak_last = 0, [0.0, 0], None
        if self.streak >= PATIENCE:
            total, count = self.streak_flagged
            self.sq_norm_mean, self.n_norms = total / count, max(self.n_norms, 4)
            self.streak, self.streak_flagged, self.streak_last = 0, [0.0, 0], None
        self.step, self.step_flagged = step, [0.0, 0]

    def state(self) -> dict[str, float]:
        return {"sq_norm_mean": self.sq_norm_mean, "n_norms": self.n_norms,
                "outlier_step": -1 if self.step is None else self.step,
                "outlier_step_flagged": list(self.step_flagged), "outlier_streak": self.streak,
                "outlier_streak_flagged": list(self.streak_flagged),
                "outlier_streak_last": -1 if self.streak_last is None else self.streak_last}

    def load_state(self, saved: dict[str, float]) -> None:
        """As :meth:`state` wrote it; a resume file of an earlier version holds the reference
        only (the streak starts again)."""
        self.sq_norm_mean, self.n_norms = float(saved["sq_norm_mean"]), int(saved["n_norms"])
        step, last = int(saved.get("outlier_step", -1)), int(saved.get("outlier_streak_last", -1))
        self.step = None if step < 0 else step
        self.streak_last = None if last < 0 else last
        self.step_flagged = [float(x) for x in saved.get("outlier_step_flagged", [0.0, 0])]
        self.step_flagged[1] = int(self.step_flagged[1])
        self.streak = int(saved.get("outlier_streak", 0))
        self.streak_flagged = [float(x) for x in saved.get("outlier_streak_flagged", [0.0, 0])]
        self.streak_flagged[1] = int(self.streak_flagged[1])
