"""When a reward change measured on sampled rollouts is resolved from 0.

Every change the analysis reports (a shard's removal, its removal against a random direction's,
the span's shares) is a mean over ``n`` prompts of a per-prompt paired difference, with the
standard error those prompts give (``interventions.paired_change``). That error is itself
estimated from the ``n`` prompts, so ``mean / stderr`` follows Student's t with ``n - 1``
degrees of freedom, not a normal distribution: read against the normal's 2, an estimate of
nothing passes 5.5% of the time at 32 prompts and 8.5% at 8, not 4.55%.

The rule here is one level, ``RESOLVED_LEVEL`` (4.55%, that of a 2-standard-error normal test),
read on Student's t over the estimate's prompts: one estimate needs ``|mean| > t_n * stderr``
(``resolved_bound``: 2.08 for 32 prompts, 2.43 for 8, tending to 2), and several judged
together are corrected with Holm's step-down procedure at the same level
(``resolved_together``). The level is exact for normally distributed per-prompt differences;
rewards that change on few prompts are discrete, for which it is an approximation.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

RESOLVED_SE = 2.0
"""The normal limit of ``resolved_bound`` (many prompts): a 2-standard-error test."""

RESOLVED_LEVEL = math.erfc(RESOLVED_SE / math.sqrt(2))
"""The two-sided level of one test (4.55%), and the family level of :func:`resolved_together`."""


def t_p_value(t: float, df: int) -> float:
    """Two-sided p-value ``P(|T| >= |t|)`` of Student's t with ``df`` >= 1 degrees of freedom,
    from the closed form for integer ``df`` (a finite series in ``cos(theta)``, ``theta =
    atan(|t| / sqrt(df))``; Abramowitz and Stegun 26.7.3-4)."""
    if df < 1:
        raise ValueError(f"Student's t needs df >= 1, got {df}")
    theta = math.atan(abs(t) / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2:  # odd: (2/pi) (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...))
        term = series = 1.0
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            series += term
        inside = 2 / math.pi * (theta + (s * math.cos(theta) * series if df > 1 else 0.0))
    else:  # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
        term = series = 1.0
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            series += term
        inside = s * series
    return min(1.0, max(0.0, 1.0 - inside))


@functools.lru_cache(maxsize=256)
def t_bound(level: float, df: int) -> float:
    """The ``|t|`` whose two-sided p-value is ``level`` with ``df`` degrees of freedom."""
    lo, hi = 0.0, 1.0
    while t_p_value(hi, df) > level:
        hi *= 2
    for _ in range(100):  # bisection: t_p_value falls as |t| grows
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_p_value(mid, df) > level else (lo, mid)
    return hi


def resolved_bound(n: int) -> float:
    """How many standard errors an estimate over ``n`` prompts must exceed to be resolved from
    0 at ``RESOLVED_LEVEL`` (Student's t, ``n - 1`` degrees of freedom): 2.08 for 32 prompts;
    the normal's 2 for ``n`` of 0 (not known)."""
    return RESOLVED_SE if n == 0 else t_bound(RESOLVED_LEVEL, max(1, n - 1))


def within_noise(value: float, stderr: float, n: int) -> bool:
    """Whether ``value``, a mean over ``n`` prompts with standard error ``stderr``, is not
    resolved from 0: within ``resolved_bound(n)`` standard errors of it. The boundary itself
    is within (as :func:`resolved_together` has it)."""
    return abs(value) <= resolved_bound(n) * stderr


def resolved_together(values: Sequence[float], stderrs: Sequence[float], n: int) -> list[bool]:
    """Which of several estimates, each a mean over ``n`` prompts with its standard error, are
    resolved from 0 as a family: Holm's step-down correction of two-sided Student's t tests at
    ``RESOLVED_LEVEL``.

    One estimate alone is resolved exactly when :func:`within_noise` says it is not; K of them
    together need more (the most resolved one ``|t| > 2.86`` for K = 6 at 32 prompts;
    :func:`holm_first_bound`), so that K estimates of nothing mark one resolved by chance in
    4.55% of cases, not in about 1 - 0.9545^K (25% for 6). An estimate with a NaN is not
    resolved; one with a standard error of 0 is exactly when it is not 0."""
    df = max(1, n - 1)

    def p_value(value: float, stderr: float) -> float:
        if math.isnan(value) or math.isnan(stderr):
            return 1.0
        if stderr <= 0:
            return 0.0 if value != 0 else 1.0
        if n == 0:  # not known: the normal limit
            return math.erfc(abs(value) / (stderr * math.sqrt(2)))
        return t_p_value(abs(value) / stderr, df)

    p = [p_value(v, s) for v, s in zip(values, stderrs, strict=True)]
    resolved = [False] * len(p)
    for rank, i in enumerate(sorted(range(len(p)), key=p.__getitem__)):
        if p[i] >= RESOLVED_LEVEL / (len(p) - rank) or p[i] == 1.0:
            break  # Holm stops at its first failure: every larger p-value fails too
        resolved[i] = True
    return resolved


def holm_first_bound(k: int, n: int) -> float:
    """The ``|t|`` the most resolved of ``k`` estimates over ``n`` prompts must pass in
    :func:`resolved_together`."""
    if n == 0:
        from statistics import NormalDist

        return NormalDist().inv_cdf(1 - RESOLVED_LEVEL / (2 * k))
    return t_bound(RESOLVED_LEVEL / k, max(1, n - 1))
