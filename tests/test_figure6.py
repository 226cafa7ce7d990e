"""experiments/figure6.py: which ImageNet workdirs it compares with, and its intervals."""

import math

import pytest

from experiments import figure6
from experiments.configs import compare_imagenet, compare_self_supervised


def test_imagenet_comparison_is_restricted_to_the_self_supervised_groups():
  own = compare_self_supervised.get_config()
  imagenet = compare_imagenet.get_config()
  assert len(imagenet.groups) > len(own.groups)
  restricted = figure6.same_groups(imagenet, own)
  assert [tuple(g) for g in restricted.groups] == [tuple(g) for g in own.groups]
  assert len(imagenet.groups) == 2  # the caller's config is left as it was
  own.groups = (tuple(imagenet.groups[1]),)  # g0_s* would name another group's workdirs
  with pytest.raises(ValueError, match="must be the first groups"):
    figure6.same_groups(imagenet, own)


def test_interval_is_the_student_t_half_width():
  mean, half = figure6.interval([0.2, 0.4, 0.6])
  assert mean == pytest.approx(0.4)
  assert half == pytest.approx(4.302653 * 0.2 / math.sqrt(3), rel=1e-5)
  assert math.isnan(figure6.interval([0.5])[1])
