"""A statistical margin for an accuracy budget judged on a finite sample.

Rule: a pruned model is compared with the original on the same ``n`` labelled samples;
``lost`` of them the original gets right and the pruned model wrong, ``gained`` the reverse.
The accuracy drop is ``(lost - gained) / n``; its one-sided upper confidence bound at level
``confidence`` is the adjusted Wald bound for a paired difference of proportions (Bonett and
Price 2012: one sample added to each discordant cell, ``n + 2`` samples), which stays
sensible when the discordant counts are small or zero. Its coverage is close to the
confidence asked when a few samples or more are expected to change, and can fall below it
when fewer than about two are (a bound on a handful of counts is coarse).
"""

from __future__ import annotations

import math
from statistics import NormalDist


def drop_upper(lost: int, gained: int, n: int, confidence: float) -> float:
    """Upper confidence bound of the accuracy drop from paired counts (the rule above);
    ``confidence`` 0 (or no samples) gives the plain drop."""
    if n <= 0:
        return 0.0
    plain = (lost - gained) / n
    if confidence <= 0:
        return plain
    b, c, m = lost + 1.0, gained + 1.0, n + 2.0
    diff = (b - c) / m
    var = max((b + c) / m - diff * diff, 0.0) / m
    return diff + NormalDist().inv_cdf(confidence) * math.sqrt(var)
