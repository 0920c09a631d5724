"""The outlier test shared by the per-step and per-event captures (``capture.outlier_ratio``)."""

from __future__ import annotations

import math


class NormOutliers:
    """Flags a sample whose norm exceeds ``ratio`` times the running RMS of the accepted norms.

    The test starts at the 5th sample; a sample that passes updates the reference (arithmetic
    mean of squared norms over the first 50, then an EMA of rate 0.02). ``ratio`` 0 never flags.
    """

    def __init__(self, ratio: float) -> None:
        self.ratio = ratio
        self.sq_norm_mean = 0.0  # running mean of the accepted samples' squared norms
        self.n_norms = 0

    @property
    def rms(self) -> float:
        return math.sqrt(self.sq_norm_mean)

    def is_outlier(self, norm: float) -> bool:
        if self.ratio and self.n_norms >= 4 and norm > self.ratio * self.rms:
            return True
        self.n_norms += 1
        rate = max(1.0 / self.n_norms, 0.02)
        self.sq_norm_mean += rate * (norm * norm - self.sq_norm_mean)
        return False

    def state(self) -> dict[str, float]:
        return {"sq_norm_mean": self.sq_norm_mean, "n_norms": self.n_norms}

    def load_state(self, saved: dict[str, float]) -> None:
        self.sq_norm_mean, self.n_norms = float(saved["sq_norm_mean"]), int(saved["n_norms"])
