"""The multi-host flags every command shares (rare_jax/infra/distributed_flags.py)."""

import jax
import pytest
from absl.testing import flagsaver

from rare_jax.infra import distributed_flags

distributed_flags.define()
distributed_flags.define()  # idempotent: a second entry point in one process defines nothing


def test_no_flags_is_one_process():
  with flagsaver.flagsaver():
    assert distributed_flags.settings() == dict(
      coordinator_address=None, num_processes=None, process_id=None, auto_detect=False
    )
    distributed_flags.initialize()  # a no-op
  assert jax.process_count() == 1


def test_explicit_cluster_and_auto():
  with flagsaver.flagsaver(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3):
    assert distributed_flags.settings() == dict(
      coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3, auto_detect=False
    )
  with flagsaver.flagsaver(coordinator_address="auto"):
    assert distributed_flags.settings() == dict(
      coordinator_address=None, num_processes=None, process_id=None, auto_detect=True
    )


@pytest.mark.parametrize(
  "values, message",
  [
    (dict(coordinator_address="h:1", num_processes=2), "needs --num_processes and --process_id"),
    (dict(num_processes=2, process_id=0), "need --coordinator_address"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=2), "--process_id=2"),
  ],
)
def test_incomplete_or_bad_flags_are_refused(values, message):
  with flagsaver.flagsaver(**values), pytest.raises(ValueError, match=message):
    distributed_flags.settings()
