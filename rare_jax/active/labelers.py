"""Who answers the queries: the `Labeler` protocol and the simulated labeler of research runs."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Labeler(Protocol):
  """Answers yes/no for (category, image) pairs.

  `answer(query_ids)` takes `[C, B]` pool positions (row c holds the images asked about
  category c of the group) and returns `[C, B]` bool answers, True meaning "is category c".
  """

  def answer(self, query_ids: np.ndarray) -> np.ndarray: ...


class SimulatedLabeler:
  """Reads the ground truth: the labeler of the paper's research runs.

  Args:
    ground_truth: `[C, P]` bool, True where pool image p belongs to category c.
  """

  def __init__(self, ground_truth: np.ndarray):
    ground_truth = np.asarray(ground_truth)
    if ground_truth.ndim != 2 or ground_truth.dtype != bool:
      raise ValueError(
        f"ground_truth must be a [C, P] bool array, got {ground_truth.dtype} {ground_truth.shape}"
      )
    self.ground_truth = ground_truth

  def answer(self, query_ids: np.ndarray) -> np.ndarray:
    query_ids = np.asarray(query_ids)
    num_categories, pool_size = self.ground_truth.shape
    if query_ids.ndim != 2 or query_ids.shape[0] != num_categories:
      raise ValueError(
        f"query_ids must be [C={num_categories}, B] pool positions, got shape {query_ids.shape}"
      )
    if query_ids.size and (query_ids.min() < 0 or query_ids.max() >= pool_size):
      raise ValueError(
        f"query ids must be pool positions in [0, {pool_size}), got range "
        f"[{query_ids.min()}, {query_ids.max()}]"
      )
    return np.take_along_axis(self.ground_truth, query_ids, axis=1)


def check_answers(
  query_ids: np.ndarray, answered_ids: np.ndarray, answers: np.ndarray
) -> np.ndarray:
  """Validates answers that arrive with their ids (a log, a browser) against the query.

  Returns:
    `[C, B]` bool answers aligned with `query_ids`.

  Raises:
    ValueError: if an answered id was not queried for that category, an id is answered twice,
      or a queried id has no answer.
  """
  query_ids = np.asarray(query_ids)
  answered_ids = np.asarray(answered_ids)
  answers = np.asarray(answers)
  if answered_ids.shape != query_ids.shape or answers.shape != query_ids.shape:
    raise ValueError(
      f"expected answers for the queried ids of shape {query_ids.shape}, got ids "
      f"{answered_ids.shape} and answers {answers.shape}"
    )
  if answers.dtype != bool:
    raise ValueError(f"answers must be bool, got {answers.dtype}")
  aligned = np.zeros(query_ids.shape, bool)
  for c in range(query_ids.shape[0]):
    position = {int(i): k for k, i in enumerate(query_ids[c])}
    seen = set()
    for i, a in zip(answered_ids[c].tolist(), answers[c].tolist(), strict=True):
      if i not in position:
        raise ValueError(
          f"category {c}: answer for id {i}, which was not queried (queried: {sorted(position)})"
        )
      if i in seen:
        raise ValueError(f"category {c}: id {i} answered more than once")
      seen.add(i)
      aligned[c, position[i]] = a
  return aligned
