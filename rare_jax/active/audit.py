"""An audit of a classifier without a validation set: a small stratified random sample that a
person labels, and design-based estimates of precision, recall and positives still unfound.

    design = draw(probabilities, unlabeled, size=50, seed=1)   # which images to ask, and how
    answers = {index: person_says_yes(index) for index in design.sample}
    result = estimate(design, answers, scores=probabilities, known_positives=found)

The frame is the images without a training label when the audit is drawn (`eligible`): the
loop's own queries and seeds are never audited, and audit answers never enter the training
set (they are kept apart by the caller: `rare_jax.webapp.audit`). The frame is split into
three strata by the score at the time of the draw:

    0 "above": score >= threshold (what the classifier calls positive)
    1 "near":  the highest-scored tenth of the images below the threshold (at least `size`
               of them): where missed positives are most likely
    2 "far":   every other image below the threshold

and a simple random sample without replacement of n_h images is drawn from stratum h
(allocation `ALLOCATION` of `size`, a census of a stratum smaller than its share, at least
one image from every non-empty stratum), so every frame image has the known inclusion
probability n_h / N_h > 0. `design.sample` lists the sample in an interleaved random order:
every prefix holds each stratum in proportion (within one image), and within a stratum the
order is random, so the images answered so far are a stratified simple random sample at any
point of the audit.

Estimands, for the current model at `threshold`, over the unlabeled pool now (U: the frame
minus images labeled for training since the draw):
  precision = Y_A / |A|, A = {i in U: score_i >= threshold}, Y_A = positives in A;
  unfound   = Y_B, the positives among U's images below the threshold;
  recall    = (K + Y_A) / (K + Y_A + Y_B), K = the positives known from training labels
              (seeds included): the share of all the pool's positives that the labels plus the
              classifier's calls hold.
Point estimates are the stratified (Horvitz-Thompson) expansion estimates
Y_d = sum_h N_h / n_h * (yes answers in stratum h and domain d), with n_h the answered images
of stratum h: unbiased, with no model of the scores. The 95% intervals come from posterior
draws of the unanswered images' positives, cell by cell (stratum h x domain d, a simple random
sample of the cell given its size), BetaBinomial(N_hd - n_hd, x_hd + a, n_hd - x_hd + b):
the lower bounds from Beta(x, n - x + 1) per cell (a = 0, b = 1: none in the rest when no
positive was seen) and the upper bounds from Beta(x + 1, n - x) (a = 1, b = 0), the two
posteriors whose quantiles are Clopper-Pearson's exact bounds for a single cell. Precision,
recall and unfound are computed per draw (recall's lower bound from the lower draws of Y_A and
the upper draws of Y_B, and the other way round), so ratios and counts of 0, 1 or 2 positives
need no normal approximation. An interval is widened to hold its point estimate if it does not.
The intervals are conservative: docs/audit.md gives the measured coverage (0.97-1.00 for 95%)
and why Jeffreys' single posterior (`method="jeffreys"`, narrower) is not the default.

A newer model: the estimate may use other scores than the draw (the loop went on, a deep
update changed the features). The design stays valid: the inclusion probabilities are those of
the draw and known for every frame image; the domains A and B are taken under the new scores
(domain estimation within each stratum), and images labeled since the draw (`unlabeled`) leave
U and count in K through their labels. Only images that are unlabeled now but were labeled at
the draw (possible after a correction replays the loop) are outside the frame: they are counted
as `uncovered` and not estimated (start a new audit).

Pure NumPy (no compilation): an estimate takes about 10-50 ms (2,000-20,000 draws), so the
coverage test calls it for hundreds of audits.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

STRATA = ("above", "near", "far")
# Shares of the audit per stratum. "far", much the largest, gets half: with a rare category
# few positives lie there, and its unseen images are what bound the recall from below.
ALLOCATION = (0.25, 0.25, 0.5)
NEAR_FRACTION = 0.1  # "near": this share of the images below the threshold, at least `size`
MAX_SIZE = 2000  # largest audit drawn
MAX_DRAWS = 100_000
METHODS = ("exact", "jeffreys")
LEVEL = 0.95


@dataclasses.dataclass(frozen=True)
class AuditDesign:
  """A drawn audit: the strata of the frame and the sample, with inclusion probabilities.

  Attributes:
    pool_size: P.
    threshold: the probability that split "above" from below at the draw.
    seed: the draw's seed.
    stratum_of: int8 `[P]`: each frame image's stratum (index into STRATA); -1 outside the
      frame (labeled at the draw).
    sample: int `[n]` pool indices to ask, in the interleaved random order (see the module).
    population: N_h, frame images per stratum.
    planned: n_h, sampled images per stratum.
  """

  pool_size: int
  threshold: float
  seed: int
  stratum_of: np.ndarray
  sample: np.ndarray
  population: tuple[int, ...]
  planned: tuple[int, ...]

  @property
  def size(self) -> int:
    return int(len(self.sample))

  def inclusion_probability(self) -> np.ndarray:
    """float64 `[P]`: n_h / N_h for every frame image of stratum h, 0 outside the frame."""
    probability = np.array(
      [n / N if N else 0.0 for n, N in zip(self.planned, self.population, strict=True)]
    )
    return np.where(self.stratum_of >= 0, probability[np.maximum(self.stratum_of, 0)], 0.0)

  def to_json(self) -> dict[str, Any]:
    """JSON-ready; `from_json` reads it back (the strata as one character per pool image:
    "0", "1", "2", or "-" outside the frame)."""
    return {
      "format": "rare_jax.AuditDesign/1",
      "pool_size": self.pool_size,
      "threshold": self.threshold,
      "seed": self.seed,
      "strata_names": list(STRATA),
      "population": list(self.population),
      "planned": list(self.planned),
      "sample": [int(i) for i in self.sample],
      "stratum_of": "".join("-" if s < 0 else str(int(s)) for s in self.stratum_of),
    }

  @classmethod
  def from_json(cls, data: Any) -> AuditDesign:
    """The design `to_json` wrote, checked (the file may be damaged: ValueError says how)."""
    if not isinstance(data, dict) or data.get("format") != "rare_jax.AuditDesign/1":
      raise ValueError("not an audit design; expected an object of format rare_jax.AuditDesign/1")
    text = data.get("stratum_of")
    pool_size = data.get("pool_size")
    if not _is_int(pool_size) or not isinstance(text, str) or len(text) != pool_size:
      raise ValueError(
        f"audit design: stratum_of of {len(text) if isinstance(text, str) else text!r} "
        f"characters for pool_size {pool_size!r}; expected one character per pool image"
      )
    if not set(text) <= {"-", "0", "1", "2"}:
      raise ValueError("audit design: stratum_of holds characters other than '-', '0', '1', '2'")
    stratum_of = np.frombuffer(text.encode(), np.uint8).astype(np.int8) - ord("0")
    stratum_of[stratum_of < 0] = -1
    sample = data.get("sample")
    if not isinstance(sample, list) or not all(_is_int(i) for i in sample):
      raise ValueError("audit design: sample must be a list of pool indices")
    sample = np.asarray(sample, np.int64).reshape(-1)
    threshold, seed = data.get("threshold"), data.get("seed")
    if not isinstance(threshold, float) or not 0 < threshold < 1 or not _is_int(seed):
      raise ValueError(
        f"audit design: threshold={threshold!r}, seed={seed!r}; expected a "
        "probability in (0, 1) and an int"
      )
    population = tuple(np.bincount(stratum_of[stratum_of >= 0], minlength=len(STRATA)).tolist())
    if len(sample) and (sample.min() < 0 or sample.max() >= pool_size):
      raise ValueError(f"audit design: sample indices outside [0, {pool_size})")
    if len(np.unique(sample)) != len(sample) or (len(sample) and (stratum_of[sample] < 0).any()):
      raise ValueError("audit design: the sample repeats an image or holds one outside the frame")
    planned = tuple(np.bincount(stratum_of[sample], minlength=len(STRATA)).tolist())
    if list(population) != data.get("population") or list(planned) != data.get("planned"):
      raise ValueError("audit design: population/planned disagree with stratum_of and sample")
    return cls(
      pool_size=pool_size,
      threshold=threshold,
      seed=seed,
      stratum_of=stratum_of,
      sample=sample,
      population=population,
      planned=planned,
    )


@dataclasses.dataclass(frozen=True)
class Interval:
  """A point estimate with its 95% interval."""

  value: float
  low: float
  high: float

  def to_json(self) -> dict[str, float]:
    return {"value": self.value, "low": self.low, "high": self.high}


@dataclasses.dataclass(frozen=True)
class AuditEstimate:
  """What an audit says about the current model at `threshold`.

  Attributes:
    precision, recall, unfound: estimates with 95% intervals; None while some stratum that
      holds unlabeled images has no answer yet, and precision also when no unlabeled image
      scores above the threshold (nothing to be precise about).
    labeled: audit images answered; planned: the audit's size.
    threshold: the probability the model's calls are taken at.
    known_positives: K, positives known from training labels.
    predicted_positive: |A|, unlabeled images at or above the threshold now.
    unlabeled: |U|, unlabeled frame images now.
    uncovered: unlabeled images outside the frame (labeled at the draw): not estimated.
    yes: audit answers "yes" so far.
    strata: per stratum {name, images (N_h), planned, answered, yes}.
  """

  precision: Interval | None
  recall: Interval | None
  unfound: Interval | None
  labeled: int
  planned: int
  threshold: float
  known_positives: int
  predicted_positive: int
  unlabeled: int
  uncovered: int
  yes: int
  strata: tuple[dict[str, Any], ...]

  def to_json(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    for name in ("precision", "recall", "unfound"):
      value = getattr(self, name)
      out[name] = None if value is None else value.to_json()
    out["strata"] = [dict(s) for s in self.strata]
    out["summary"] = summary(self)
    return out


def draw(
  scores: np.ndarray,
  eligible: np.ndarray,
  *,
  size: int,
  threshold: float = 0.5,
  seed: int,
) -> AuditDesign:
  """Draws an audit of `size` images (all eligible ones if fewer) from the eligible images.

  Args:
    scores: float `[P]`: the current model's probabilities for one category.
    eligible: bool `[P]`: the images that may be audited: those with no training label now.
    size: images to draw, in [1, MAX_SIZE].
    threshold: the model's calls are score >= threshold.
    seed: the draw's seed (an int >= 0).

  Raises:
    ValueError: bad shapes or values, or no eligible image.
  """
  scores = _probabilities(scores, "scores")
  eligible = _mask(eligible, "eligible", len(scores))
  threshold = _threshold(threshold)
  if not _is_int(size) or not 1 <= size <= MAX_SIZE:
    raise ValueError(f"size={size!r}; expected an int in [1, {MAX_SIZE}]")
  if not _is_int(seed) or not 0 <= seed < 2**63:
    raise ValueError(f"seed={seed!r}; expected an int >= 0")
  frame = np.flatnonzero(eligible)
  if not len(frame):
    raise ValueError("no image is eligible for an audit: every image has a training label")
  stratum_of = np.full(len(scores), -1, np.int8)
  above = frame[scores[frame] >= threshold]
  below = frame[scores[frame] < threshold]
  # Below the threshold, highest score first (ties: lowest index first).
  below = below[np.lexsort((below, -scores[below]))]
  near = min(len(below), max(size, math.ceil(NEAR_FRACTION * len(below))))
  stratum_of[above] = 0
  stratum_of[below[:near]] = 1
  stratum_of[below[near:]] = 2
  population = np.bincount(stratum_of[frame], minlength=len(STRATA))
  planned = allocate(min(size, len(frame)), population)
  rng = np.random.default_rng(seed)
  picks, keys = [], []
  for h in range(len(STRATA)):
    members = np.flatnonzero(stratum_of == h)
    chosen = rng.permutation(members)[: planned[h]]
    picks.append(chosen)
    # Interleaving: the j-th pick of stratum h sorts at (j + u) / n_h.
    keys.append((np.arange(len(chosen)) + rng.random(len(chosen))) / max(len(chosen), 1))
  picks, keys = np.concatenate(picks), np.concatenate(keys)
  return AuditDesign(
    pool_size=len(scores),
    threshold=threshold,
    seed=int(seed),
    stratum_of=stratum_of,
    sample=picks[np.argsort(keys, kind="stable")].astype(np.int64),
    population=tuple(int(n) for n in population),
    planned=tuple(int(n) for n in planned),
  )


def allocate(size: int, population: Sequence[int]) -> np.ndarray:
  """n_h per stratum: `ALLOCATION` shares of `size` among the non-empty strata, a census of a
  stratum smaller than its share (its rest shared among the others in proportion), rounded by
  largest remainder, at least 1 per non-empty stratum; sums to min(size, sum(population))."""
  population = np.asarray(population, np.int64)
  size = min(int(size), int(population.sum()))
  share = np.asarray(ALLOCATION, float)
  planned = np.zeros(len(population), np.int64)
  nonempty = population > 0
  if nonempty.sum() > size:  # fewer images than strata: the largest strata first
    planned[np.argsort(-population, kind="stable")[:size]] = 1
    return planned
  free, budget = nonempty.copy(), size
  target = np.zeros(len(population))
  while free.any():
    target = np.where(free, share / share[free].sum() * budget, 0.0)
    capped = free & (target >= population)
    if not capped.any():
      break
    planned[capped] = population[capped]
    budget -= int(population[capped].sum())
    free &= ~capped
  if free.any():
    planned[free] = np.floor(target[free]).astype(np.int64)
    left = budget - int(planned[free].sum())
    remainder = np.where(free, target - np.floor(target), -1.0)
    planned[np.argsort(-remainder, kind="stable")[:left]] += 1
  while (nonempty & (planned == 0)).any():  # every non-empty stratum is sampled
    planned[int(np.argmax(planned))] -= 1
    planned[int(np.argmax(nonempty & (planned == 0)))] += 1
  return planned


def estimate(
  design: AuditDesign,
  answers: Mapping[int, bool],
  *,
  scores: np.ndarray,
  threshold: float = 0.5,
  known_positives: int,
  unlabeled: np.ndarray | None = None,
  draws: int = 20_000,
  method: str = "exact",
) -> AuditEstimate:
  """Precision, recall and unfound positives of the model whose probabilities are `scores`.

  Args:
    design: from `draw`.
    answers: {pool index: is it a positive} for the audit images answered so far (only
      indices of `design.sample`).
    scores: float `[P]`: the current model's probabilities (may be a newer model than the
      draw's: see the module).
    threshold: the model's calls are score >= threshold.
    known_positives: K, the pool's positives known from training labels (seeds included).
    unlabeled: bool `[P]`: images without a training label now (default: the frame). Frame
      images labeled since the draw leave the estimate (their labels are in K).
    draws: posterior draws for the intervals (seeded by the design: the same inputs give the
      same intervals).
    method: "exact" (Clopper-Pearson-like bracketing posteriors: the default, see docs/audit.md)
      or "jeffreys" (one posterior under Jeffreys' prior: narrower, under-covers with few
      positives; kept for the comparison in docs/audit.md).

  Raises:
    ValueError: an answer for an image not in the audit, a non-bool answer, bad shapes.
  """
  scores = _probabilities(scores, "scores")
  if len(scores) != design.pool_size:
    raise ValueError(f"scores of {len(scores)} images; expected the pool's {design.pool_size}")
  threshold = _threshold(threshold)
  if not _is_int(known_positives) or known_positives < 0:
    raise ValueError(f"known_positives={known_positives!r}; expected an int >= 0")
  if not _is_int(draws) or not 100 <= draws <= MAX_DRAWS:
    raise ValueError(f"draws={draws!r}; expected an int in [100, {MAX_DRAWS}]")
  if method not in METHODS:
    raise ValueError(f"method={method!r}; expected one of {METHODS}")
  frame = design.stratum_of >= 0
  unlabeled = frame if unlabeled is None else _mask(unlabeled, "unlabeled", design.pool_size)
  in_sample = np.zeros(design.pool_size, bool)
  in_sample[design.sample] = True
  answered = np.zeros(design.pool_size, bool)
  yes = np.zeros(design.pool_size, bool)
  for index, answer in answers.items():
    if not _is_int(index) or not 0 <= index < design.pool_size or not in_sample[index]:
      raise ValueError(f"answer for image {index!r}, which is not in the audit sample")
    if not isinstance(answer, (bool, np.bool_)):
      raise ValueError(f"answer for image {index} is {answer!r}; expected true or false")
    answered[index], yes[index] = True, bool(answer)

  current = unlabeled & frame
  called = scores >= threshold
  strata = design.stratum_of
  num = len(STRATA)
  n_h = np.bincount(strata[answered], minlength=num)  # answered per stratum (any domain)
  cells = []  # (stratum, domain, N_hd, n_hd, x_hd)
  for h in range(num):
    for d, in_domain in ((0, called), (1, ~called)):
      members = current & (strata == h) & in_domain
      cells.append(
        (h, d, int(members.sum()), int((members & answered).sum()), int((members & yes).sum()))
      )
  size_a = int((current & called).sum())
  result = dict(
    labeled=int(answered.sum()),
    planned=design.size,
    threshold=threshold,
    known_positives=int(known_positives),
    predicted_positive=size_a,
    unlabeled=int(current.sum()),
    uncovered=int((unlabeled & ~frame).sum()),
    yes=int(yes.sum()),
    strata=tuple(
      {
        "name": STRATA[h],
        "images": design.population[h],
        "planned": design.planned[h],
        "answered": int(n_h[h]),
        "yes": int((yes & (strata == h)).sum()),
      }
      for h in range(num)
    ),
  )
  if any(N > 0 and n_h[h] == 0 for h, _, N, _, _ in cells):
    return AuditEstimate(precision=None, recall=None, unfound=None, **result)

  # Point estimates: stratified expansion (Horvitz-Thompson with the answered n_h), each
  # domain total clipped to what its answers allow (only a newer model can leave that range).
  totals = np.zeros(2)
  lowest, highest = np.zeros(2), np.zeros(2)
  for h, d, N, n, x in cells:
    if N:
      totals[d] += design.population[h] / n_h[h] * x
      lowest[d] += x
      highest[d] += N - (n - x)
  totals = np.clip(totals, lowest, highest)

  # Posterior draws of each domain total: answered positives + the unanswered images'
  # positives, BetaBinomial per cell. "exact": two bracketing posteriors, Beta(x, n - x + 1)
  # (stochastically smallest: the lower bounds) and Beta(x + 1, n - x) (largest: the upper
  # bounds), whose quantiles are Clopper-Pearson's bounds for one cell; "jeffreys": one
  # Beta(x + 1/2, n - x + 1/2).
  rng = np.random.default_rng([design.seed, 0x0A0D17])
  shifts = {"exact": ((0.0, 1.0), (1.0, 0.0)), "jeffreys": ((0.5, 0.5),)}[method]
  domain, total, asked, positive = (np.array([cell[i] for cell in cells]) for i in range(1, 5))
  rest = total - asked
  low_high = []
  for a, b in shifts:
    alpha, beta = positive + a, asked - positive + b
    samples = np.zeros((2, draws))
    # alpha = 0 (no positive seen, lower posterior): none in the rest; beta = 0 (every answer
    # positive, upper posterior): all of the rest.
    fixed = positive + np.where((rest > 0) & (alpha > 0) & (beta == 0), rest, 0)
    drawn = (rest > 0) & (alpha > 0) & (beta > 0)
    p = rng.beta(alpha[drawn, None], beta[drawn, None], size=(int(drawn.sum()), draws))
    counts = rng.binomial(rest[drawn, None], p)
    for d in (0, 1):
      samples[d] += fixed[domain == d].sum() + counts[domain[drawn] == d].sum(axis=0)
    low_high.append(samples)
  low, high = low_high[0], low_high[-1]
  k = float(known_positives)

  def recall(y_a, y_b):
    den = k + y_a + y_b
    return np.where(den > 0, (k + y_a) / np.where(den > 0, den, 1), 0.0)

  def interval(value, low_values, high_values):
    lo = np.quantile(low_values, (1 - LEVEL) / 2)
    hi = np.quantile(high_values, (1 + LEVEL) / 2)
    return Interval(float(value), float(min(lo, value)), float(max(hi, value)))

  # Recall grows with Y_A and falls with Y_B: its lower bound pairs Y_A's lower posterior
  # with Y_B's upper one, and the other way round.
  recall_interval = interval(
    float(recall(totals[0], totals[1])), recall(low[0], high[1]), recall(high[0], low[1])
  )
  precision = None
  if size_a:
    precision = interval(totals[0] / size_a, low[0] / size_a, high[0] / size_a)
  return AuditEstimate(
    precision=precision,
    recall=recall_interval,
    unfound=interval(totals[1], low[1], high[1]),
    **result,
  )


def summary(result: AuditEstimate) -> str:
  """One plain sentence for the page."""
  done = f"{result.labeled} of {result.planned} audit images answered"
  if result.recall is None:
    return f"{done}: the estimate appears once every part of the audit has an answer."

  def pct(v: Interval) -> str:
    return f"{100 * v.value:.0f}% (95% interval {100 * v.low:.0f}-{100 * v.high:.0f}%)"

  parts = []
  if result.precision is None:
    parts.append(f"no unlabeled image scores {result.threshold:g} or more")
  else:
    parts.append(
      f"precision {pct(result.precision)} of the {result.predicted_positive} unlabeled images "
      f"scored {result.threshold:g} or more"
    )
  parts.append(f"recall {pct(result.recall)}")
  u = result.unfound
  parts.append(
    f"about {u.value:.0f} positives still unfound below the threshold "
    f"(95% interval {u.low:.0f}-{u.high:.0f})"
  )
  text = f"{done}: " + "; ".join(parts) + "."
  if result.uncovered:
    text += (
      f" {result.uncovered} unlabeled images were labeled when the audit was drawn and are not "
      "covered: start a new audit to include them."
    )
  return text


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _probabilities(scores: Any, name: str) -> np.ndarray:
  scores = np.asarray(scores)
  if scores.ndim != 1 or not len(scores) or not np.issubdtype(scores.dtype, np.floating):
    raise ValueError(f"{name} of {scores.dtype} {scores.shape}; expected float probabilities [P]")
  scores = scores.astype(np.float64)
  if not (np.isfinite(scores).all() and (scores >= 0).all() and (scores <= 1).all()):
    raise ValueError(f"{name} hold values outside [0, 1] or NaN; expected probabilities")
  return scores


def _mask(mask: Any, name: str, size: int) -> np.ndarray:
  mask = np.asarray(mask)
  if mask.dtype != bool or mask.shape != (size,):
    raise ValueError(f"{name} of {mask.dtype} {mask.shape}; expected bool [{size}]")
  return mask


def _threshold(threshold: Any) -> float:
  if not isinstance(threshold, (float, int)) or isinstance(threshold, bool):
    raise ValueError(f"threshold={threshold!r}; expected a probability in (0, 1)")
  if not 0 < threshold < 1:
    raise ValueError(f"threshold={threshold!r}; expected a probability in (0, 1)")
  return float(threshold)
