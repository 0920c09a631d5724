"""The outlier test shared by the per-step and per-event captures (``capture.outlier_ratio``)."""

from __future__ import annotations

import math


class NormOutliers:
    """Flags a sample whose norm exceeds ``ratio`` times the running RMS of the norms before it.

    The reference is the mean of the squared norms over the first 50 samples, then an EMA of
    rate 0.02; the test starts at the 5th. An all-zero sample (a step that changed nothing)
    carries no scale and is left out of it: a run whose first steps change nothing would
    otherwise have a reference of 0 and flag every later sample. A flagged sample enters the
    reference at the limit (``ratio`` times the RMS), so a lasting change of scale (the first
    reward earned after steps of weight decay alone) is flagged once or twice, then accepted,
    while one wild sample moves the reference by at most that much. ``ratio`` 0 never flags.
    """

    def __init__(self, ratio: float) -> None:
        self.ratio = ratio
        self.sq_norm_mean = 0.0  # running mean of the squared norms (a flagged one at the limit)
        self.n_norms = 0
        self.last_rms = 0.0
        """The reference RMS the last sample was tested against (for the caller's message)."""

    @property
    def rms(self) -> float:
        return math.sqrt(self.sq_norm_mean)

    def is_outlier(self, norm: float) -> bool:
        if norm == 0.0:
            return False
        self.last_rms = self.rms
        limit = self.ratio * self.last_rms
        flagged = bool(self.ratio) and self.n_norms >= 4 and norm > limit
        self.n_norms += 1
        rate = max(1.0 / self.n_norms, 0.02)
        seen = limit if flagged else norm
        self.sq_norm_mean += rate * (seen * seen - self.sq_norm_mean)
        return flagged

    def state(self) -> dict[str, float]:
        return {"sq_norm_mean": self.sq_norm_mean, "n_norms": self.n_norms}

    def load_state(self, saved: dict[str, float]) -> None:
        self.sq_norm_mean, self.n_norms = float(saved["sq_norm_mean"]), int(saved["n_norms"])
