"""Top-k masks: which ``count`` entries of ``|scores|`` a unit keeps, written into its hard mask.

``torch.topk`` on CPU runs on one thread at about 10 ns an entry, ``nonzero`` and ``masked_select``
at about 1 ns, while element-wise comparisons into a float tensor and sums take about 0.1 ns. A large unit's mask is therefore found as a *cut*: a value ``v`` such
that exactly ``count`` entries are ``>= v``, and the mask is ``|scores| >= v``. The cut is read off
the few entries of a band ``[lo, hi]`` that must contain it (two comparisons and row counts say how
many entries lie above and inside the band, and which rows of 64 entries hold the band's ones).
The band comes from the unit's previous cut (:class:`CutTracker`: the scores move a little per
step) or else from a strided sample.

Where a cut exists, the top-``count`` set is unique (every kept entry is larger than every removed
one), so it is the set one ``torch.topk`` over all entries selects. Where none exists (a tie across
the boundary), or the band misses the boundary, or a value is not finite, the selection of
:func:`_select` (ranking a sampled band) or ``torch.topk`` decides, as before cuts were used.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["topk_mask", "fill_topk", "CutTracker", "CUT_MIN_SIZE", "BAND_MIN_SIZE"]

#: Units of at least this many entries are cut (:func:`fill_topk`); smaller ones call ``torch.topk``
#: (about as fast there).
CUT_MIN_SIZE = 1 << 14
#: Where no cut is found, units of at least this many entries select their top-k in two rounds
#: (:func:`_select`); smaller ones call ``torch.topk`` once.
BAND_MIN_SIZE = 1 << 15
_SAMPLE_STRIDE = 50  # every 50th entry estimates the boundary
_SAMPLE_Z = 4.0  # standard deviations of the sample quantile's rank on either side of the boundary
_ROW = 64  # entries per row whose count of band entries says whether to look at it
_MIN_SPREAD = 32  # entries on either side of the guessed cut that a tracked band covers at least,
_MIN_SPREAD_FRACTION = 1 / 4096  # and at least this fraction of the unit's entries


class _Seen(NamedTuple):
    """What one band ``[lo, hi]`` showed: entries ``>= lo`` and ``> hi``, the cut (``None``: no cut
    in the band) and the band's entries (when they were read)."""

    lo: float
    hi: float
    n_lo: int
    n_hi: int
    value: float | None = None
    band: Tensor | None = None


class CutTracker:
    """Where a unit's last cut lay, to guess the next cut's band: the cut ``value`` and the
    ``count`` it kept, its last ``move`` (value and count; ``None`` after a jump), the ``density``
    of entries around it (entries per unit of value), the ``spread`` (entries on either side of
    the guess) the next band covers, and a ``retry`` guess ``(center, spread)`` after a miss. Only
    the band depends on it, never the selected set."""

    __slots__ = ("value", "count", "move", "density", "spread", "retry")

    def __init__(self) -> None:
        self.value: float | None = None
        self.count = 0
        self.move: tuple[float, int] | None = None
        self.density = 0.0
        self.spread = 0.0
        self.retry: tuple[float, float] | None = None

    def guess(self, count: int, size: int) -> tuple[float, float, float] | None:
        """``(lo, center, hi)``: the band around where the cut keeping ``count`` of ``size`` entries
        should lie: the last cut, moved by the count's change and by the last step's drift at a
        fixed count (or where a missed band's counts put it)."""
        if self.value is None or not 0.0 < self.density < math.inf:
            return None
        if self.retry is not None:
            center, spread = self.retry
        else:
            center, spread = self.value - (count - self.count) / self.density, self.spread  # more kept: lower
            if self.move is not None:
                center += self.move[0] + self.move[1] / self.density
        half = max(spread, _MIN_SPREAD, size * _MIN_SPREAD_FRACTION) / self.density
        return center - half, center, center + half

    def observe(self, count: int, center: float | None, seen: _Seen) -> None:
        """Learn from a band around ``center`` (``None``: not a guess of this tracker)."""
        # entries per unit of value in the band (up to the cut where the band is open above)
        top, inside = (seen.hi, seen.n_lo - seen.n_hi) if seen.hi < math.inf or seen.value is None \
            else (seen.value, seen.n_lo - count)
        density = inside / (top - seen.lo) if inside >= _MIN_SPREAD and top > seen.lo else self.density
        if seen.value is None:  # missed: aim the next guess where the counts say the cut is
            if center is None or self.retry is not None or not 0.0 < density < math.inf:
                self.value, self.retry = None, None  # start again from a sample
                return
            off = count - seen.n_lo if count > seen.n_lo else seen.n_hi - count
            self.retry = (seen.lo - off / density if count > seen.n_lo else seen.hi + off / density,
                          self.spread + off / 2)
            self.density = density
            return
        tracked = center is not None and self.value is not None
        self.move = (seen.value - self.value, count - self.count) if tracked else None  # type: ignore[operator]
        self.value, self.count, self.density, self.retry = seen.value, count, density, None
        if center is not None and seen.band is not None:
            off = abs(seen.n_hi + int((seen.band >= center).sum()) - count)
            self.spread = max(4.0 * off, self.spread / 2)  # forget a large miss slowly


@torch.no_grad()
def topk_mask(scores_abs: Tensor, count: int) -> Tensor:
    """A float 0/1 tensor shaped like ``scores_abs`` with ones at its ``count`` largest entries."""
    mask = torch.empty_like(scores_abs, dtype=torch.float32)
    fill_topk(mask, scores_abs, count)
    return mask


def _sample_ranks(s: int, p: float) -> tuple[int, int]:
    """Ranks in a sample of ``s`` of the loose (outer) and tight (inner, may be < 1) bound of the
    ``p`` quantile from one end: ``_SAMPLE_Z`` standard deviations of its rank either side."""
    dev = _SAMPLE_Z * math.sqrt(s * p * (1.0 - p))
    return min(s, math.ceil(p * s + dev) + 1), math.floor(p * s - dev)


def _select(flat: Tensor, m: int, largest: bool) -> Tensor | None:
    """A bool mask of the ``m`` largest (``largest``) or smallest entries of ``flat``, or ``None``.

    Two thresholds read off a strided sample, a few standard deviations of the sample quantile's
    rank on either side of the boundary, split the entries into sure ones (beyond the inner
    threshold), a narrow band and the rest; only the band is ranked. ``None`` where the band
    misses the boundary (then rank everything)."""
    sample = flat[::_SAMPLE_STRIDE]
    s = sample.numel()
    outer_rank, inner_rank = _sample_ranks(s, m / flat.numel())

    def at_rank(r: int) -> Tensor:  # the sample's r-th largest (smallest) entry
        return torch.kthvalue(sample, s - r + 1 if largest else r).values

    outer = at_rank(outer_rank)
    band = flat >= outer if largest else flat <= outer
    if inner_rank >= 1:
        inner = at_rank(inner_rank)
        sure = flat > inner if largest else flat < inner
        band ^= sure  # sure entries lie beyond the outer threshold too
    else:
        sure = torch.zeros_like(band)
    n_sure, n_band = int(sure.count_nonzero()), int(band.count_nonzero())
    if not n_sure <= m <= n_sure + n_band:
        return None
    index = band.view(-1).nonzero().squeeze(1)
    picked = torch.topk(flat[index], m - n_sure, largest=largest, sorted=False).indices
    return sure.index_fill_(0, index[picked], True)


def _sample_band(flat: Tensor, m: int) -> tuple[float, float]:
    """``(lo, hi)`` around the ``m``-th largest entry, from every ``_SAMPLE_STRIDE``-th entry."""
    sample = flat[::_SAMPLE_STRIDE]
    s = sample.numel()
    outer_rank, inner_rank = _sample_ranks(s, m / flat.numel())
    lo = float(torch.kthvalue(sample, s - outer_rank + 1).values)
    return lo, float(torch.kthvalue(sample, s - inner_rank + 1).values) if inner_rank >= 1 else math.inf


def _row_counts(mask: Tensor) -> Tensor:
    """Ones of a flat float 0/1 ``mask`` per row of ``_ROW`` entries (the last row may be shorter)."""
    full = mask.numel() // _ROW * _ROW
    counts = mask[:full].view(-1, _ROW).sum(1)
    return counts if full == mask.numel() else torch.cat([counts, mask[full:].sum().view(1)])


def _gather_rows(flat: Tensor, rows: Tensor) -> Tensor:
    """The entries of ``rows`` (of ``_ROW`` entries) of ``flat``, and always those of its shorter last row."""
    full = flat.numel() // _ROW
    picked = flat[:full * _ROW].view(full, _ROW).index_select(0, rows[rows < full]).view(-1)
    return picked if full * _ROW == flat.numel() else torch.cat([picked, flat[full * _ROW:]])


def _scatter_rows(out: Tensor, rows: Tensor, values: Tensor) -> None:
    """Write ``values`` (laid out as :func:`_gather_rows` gives them) back into ``rows`` of ``out``."""
    full = out.numel() // _ROW
    rows = rows[rows < full]
    k = rows.numel() * _ROW
    out[:full * _ROW].view(full, _ROW).index_copy_(0, rows, values[:k].view(-1, _ROW))
    if full * _ROW < out.numel():
        out[full * _ROW:] = values[k:]


def _cut(out: Tensor, flat: Tensor, m: int, lo: float, hi: float) -> _Seen:
    """Write ``flat >= v`` into ``out`` where ``v`` in ``[lo, hi]`` keeps exactly ``m`` entries;
    no cut (``out`` overwritten) where the ``m``-th largest entry is outside ``[lo, hi]`` or ties
    with the next one."""
    lo, hi = torch.tensor([lo, hi], dtype=flat.dtype).tolist()  # compare with what flat can hold
    if not lo <= hi:
        return _Seen(lo, hi, 0, 0)
    o = out.view(-1)
    above = torch.empty_like(o)
    torch.ge(flat, lo, out=o)
    torch.gt(flat, hi, out=above)
    rows_lo, rows_hi = _row_counts(o), _row_counts(above)
    n_lo, n_hi = int(rows_lo.sum(dtype=torch.float64)), int(rows_hi.sum(dtype=torch.float64))
    if not n_hi <= m <= n_lo:
        return _Seen(lo, hi, n_lo, n_hi)
    if m == n_lo:  # o holds flat >= lo: entries below lo are smaller than all of these
        return _Seen(lo, hi, n_lo, n_hi, lo)
    if m == n_hi:
        o.copy_(above)
        return _Seen(lo, hi, n_lo, n_hi, hi)
    rows = (rows_lo - rows_hi).nonzero().squeeze(1)  # the rows holding the band's entries
    narrow = 4 * rows.numel() * _ROW <= flat.numel()
    candidates = _gather_rows(flat, rows) if narrow else flat
    band = candidates[(candidates >= lo) & (candidates <= hi)]
    j = m - n_hi  # the cut is the band's j-th largest entry
    value = torch.kthvalue(band, band.numel() - j + 1).values if band.numel() == n_lo - n_hi else None
    if value is None or int((band >= value).sum()) != j:  # a tie across the boundary: no cut keeps exactly m
        return _Seen(lo, hi, n_lo, n_hi, None, band)
    if narrow:  # o holds flat >= lo, which is flat >= value outside the band's rows
        _scatter_rows(o, rows, torch.ge(candidates, value, out=torch.empty_like(candidates)))
    else:
        torch.ge(flat, value, out=o)
    return _Seen(lo, hi, n_lo, n_hi, float(value), band)


def _tracked_cut(out: Tensor, flat: Tensor, count: int, tracker: CutTracker) -> bool:
    """Cut in the tracker's band (a second try where the first missed), else in the sample's."""
    for _ in range(2):
        guess = tracker.guess(count, flat.numel())
        if guess is None:
            break
        seen = _cut(out, flat, count, guess[0], guess[2])
        tracker.observe(count, guess[1], seen)
        if seen.value is not None:
            return True
    seen = _cut(out, flat, count, *_sample_band(flat, count))
    tracker.observe(count, None, seen)
    return seen.value is not None


@torch.no_grad()
def fill_topk(out: Tensor, scores_abs: Tensor, count: int, tracker: CutTracker | None = None) -> None:
    """Write :func:`topk_mask` into ``out`` (a contiguous float tensor shaped like ``scores_abs``).

    A unit of ``CUT_MIN_SIZE`` entries or more is cut (see the module docstring) in a band around
    ``tracker``'s previous cut, or else around a strided sample's estimate; where neither band holds
    a cut, a unit of ``BAND_MIN_SIZE`` or more ranks only a narrow band of entries around the
    boundary (:func:`_select`). The same set as one ``torch.topk``
    over all entries (which entry of a tie at the boundary is kept is arbitrary either way), at a
    fraction of its cost. Non-finite values, or a band that misses the boundary, fall back to
    ``torch.topk``."""
    flat = scores_abs.detach().reshape(-1)
    n = flat.numel()
    count = int(min(max(count, 0), n))
    if count in (0, n):
        out.fill_(float(count > 0))
        return
    finite = n >= CUT_MIN_SIZE and bool(torch.isfinite(flat.sum()))
    if finite and out.dtype == torch.float32 and _tracked_cut(out, flat, count, tracker or CutTracker()):
        return
    if finite and n >= BAND_MIN_SIZE:
        largest = 2 * count <= n  # select the kept entries, else the removed ones
        chosen = _select(flat, count if largest else n - count, largest)
        if chosen is not None:
            out.view(-1).copy_(chosen if largest else ~chosen)
            return
    out.zero_()
    out.view(-1).index_fill_(0, torch.topk(flat, count, sorted=False).indices, 1.0)
