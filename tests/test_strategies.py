"""Each strategy of runner.STRATEGIES, tested on what sets it apart from the others.

Frozen-feature behaviour (querying, pseudo-negatives) runs the loop on synthetic features; the
deep strategies run one tiny deep update each on synthetic 8x8 images through
`RunContext.updater`, the path `rare_jax.run` and `rare_jax.compare` take.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from synthetic import synthetic_images

from rare_jax import compare, workdirs
from rare_jax.active import labelers, loop, runner
from rare_jax.data import tasks
from rare_jax.deep import losses, pseudo_labels, strategies, updates

quiet = lambda _: None
POOL, DIM = 400, 8


def base_config(**overrides):
  values = dict(
    seed=0,
    features="m_pre",
    batch_size=3,
    pseudo_negative_factor=2.0,
    l2=1.0,
    solver_max_iters=100,
    solver_tol=1e-6,
    num_feature_updates=1,
    rounds_per_update=1,
    feature_normalization="standardize",
    max_pseudo_positives=0,
    deep_prop_k=5,
    fully_supervised_epochs=1,
  )
  values.update(overrides)
  return ml_collections.ConfigDict(values)


# ----------------------------------------------------------------------------------------------
# The table.


def test_every_strategy_has_a_valid_loop_config():
  config = base_config(num_feature_updates=2, rounds_per_update=5, batch_size=10)
  for name in runner.STRATEGIES:
    loop_config = runner.loop_config(config, name)
    assert loop_config.batch_size >= 10
  for name in ("ours", "tropel", "tropel_deep", "kd_semi", "deep_prop", "fully_supervised"):
    assert name in runner.STRATEGIES
  for name in ("no_pseudo_neg", "no_bg_split", "no_linear_updates", "kd_semi_0.9"):
    assert name in runner.STRATEGIES
  with pytest.raises(ValueError, match="unknown strategy 'nope'"):
    runner.loop_config(config, "nope")


def test_no_linear_updates_asks_q_times_b_once_per_update():
  config = base_config(num_feature_updates=10, rounds_per_update=5, batch_size=10)
  ablation = runner.strategy_config(config, "no_linear_updates")
  assert (ablation.num_feature_updates, ablation.rounds_per_update, ablation.batch_size) == (
    10,
    1,
    50,
  )  # the paper's N=10, B=50, Q=1
  assert runner.strategy_config(ablation, "no_linear_updates").batch_size == 50  # idempotent
  assert runner.loop_config(config, "no_linear_updates").batch_size == 50
  assert runner.loop_config(config, "ours").batch_size == 10
  assert config.batch_size == 10  # the run config is not modified
  # Same labels per category at every deep update: i * Q * B.
  ours = [i * 5 * 10 for i in range(1, 11)]
  assert [i * ablation.rounds_per_update * ablation.batch_size for i in range(1, 11)] == ours


def test_f_a_sweep_sets_the_pseudo_negative_factor():
  config = base_config(pseudo_negative_factor=100.0)
  sweep = [name for name in runner.STRATEGIES if name.startswith("f_a_")]
  assert len(sweep) >= 3
  factors = {runner.loop_config(config, name).pseudo_negative_factor for name in sweep}
  assert factors == set(runner.F_A_SWEEP) and 100.0 not in factors
  assert runner.loop_config(config, "ours").pseudo_negative_factor == 100.0
  assert runner.loop_config(config, "no_pseudo_neg").pseudo_negative_factor == 0.0


# ----------------------------------------------------------------------------------------------
# Tropel: most-likely-positive queries, no pseudo-labels (frozen features).


@pytest.fixture(scope="module")
def problem():
  rng = np.random.default_rng(0)
  truth = np.zeros((2, POOL), bool)
  truth[0, :12] = True
  truth[1, 12:24] = True
  features = rng.normal(size=(POOL, DIM)).astype(np.float32)
  features[:12, 0] += 3.0
  features[12:24, 1] += 3.0
  seed_ids = np.stack([np.arange(4), 12 + np.arange(4)]).astype(np.int32)
  return jnp.asarray(features), seed_ids, truth


def run_loop(name, problem, rounds):
  features, seed_ids, truth = problem
  engine = runner.Engine(runner.loop_config(base_config(batch_size=4), name))
  labeler = labelers.SimulatedLabeler(truth)
  state = loop.init(features, seed_ids, seed=0)
  steps = []
  for _ in range(rounds):
    ids = np.asarray(engine.query(state))
    steps.append((state, ids))
    state = engine.step(state, ids, labeler.answer(ids), features)
  return steps, state


def most_likely_positive(state, num):
  scores = np.where(np.asarray(state.labels) < 0, np.asarray(state.scores), -np.inf)
  return np.sort(np.argsort(-scores, axis=1, kind="stable")[:, :num], axis=1)


def test_tropel_never_queries_by_margin_and_never_pseudo_labels(problem):
  steps, final = run_loop("tropel", problem, 6)
  margin_rule_due = 0
  for state, ids in steps:
    np.testing.assert_array_equal(np.sort(ids, axis=1), most_likely_positive(state, 4))
    assert not np.asarray(state.pseudo_negative).any()
    positives, negatives = (np.asarray(x) for x in loop.label_counts(state.labels))
    margin_rule_due += int(bool(state.has_model) and (positives >= negatives).any())
  assert not np.asarray(final.pseudo_negative).any()
  assert margin_rule_due > 0  # Ours would have switched to the margin by now; Tropel did not.
  # Ours, on the same problem, does query by margin at some round (the test can fail).
  steps, _ = run_loop("ours_linear", problem, 6)
  assert any(
    not np.array_equal(np.sort(ids, axis=1), most_likely_positive(state, 4)) for state, ids in steps
  )


def test_no_pseudo_neg_queries_adaptively_without_pseudo_negatives(problem):
  steps, final = run_loop("no_pseudo_neg", problem, 6)
  assert not any(np.asarray(state.pseudo_negative).any() for state, _ in steps)
  assert not np.asarray(final.pseudo_negative).any()
  assert any(  # unlike Tropel, it switches to the margin once |L_p| >= |L_n|
    not np.array_equal(np.sort(ids, axis=1), most_likely_positive(state, 4)) for state, ids in steps
  )
  _, ours = run_loop("ours_linear", problem, 1)
  assert np.asarray(ours.pseudo_negative).any()


# ----------------------------------------------------------------------------------------------
# Random: ours_linear with B images drawn uniformly from the unlabeled pool (the floor).


def test_random_is_ours_linear_but_for_the_query_rule():
  config = base_config()
  ours = runner.loop_config(config, "ours_linear")
  assert runner.loop_config(config, "random") == dataclasses.replace(ours, querying="random")
  assert runner.STRATEGIES["random"] == dict(runner.STRATEGIES["ours_linear"], querying="random")
  assert "random" in compare.FIGURE_3


def test_random_queries_uniformly_not_by_the_ranking(problem):
  features, seed_ids, truth = problem
  engine = runner.Engine(runner.loop_config(base_config(batch_size=4), "random"))
  start = loop.init(features, seed_ids, seed=0)
  labels = np.asarray(start.labels)
  # Where each unlabeled image stands in the cosine ranking: 0 = most likely positive.
  order = np.argsort(-np.where(labels < 0, np.asarray(start.scores), -np.inf), axis=1)
  rank = np.argsort(order, axis=1)
  unlabeled = (labels < 0).sum(1)
  draws = np.stack(
    [np.asarray(engine.query(start.replace(seed=jnp.uint32(s)))) for s in range(250)]
  )
  for c in range(2):
    ids = draws[:, c]  # [seeds, B]
    assert (labels[c, ids] < 0).all()  # never a seed
    assert all(len(set(row)) == 4 for row in ids)  # B distinct images
    quarters = np.bincount(4 * rank[c, ids.ravel()] // unlabeled[c], minlength=4)
    assert quarters.sum() == 1000 and (np.abs(quarters - 250) < 60).all(), quarters  # 4.4 sigma
    assert (rank[c, ids] < 4).mean() < 0.05  # Tropel's rule would give 1.0
  steps, final = run_loop("random", problem, 4)
  for state, ids in steps:
    assert not np.array_equal(np.sort(ids, axis=1), most_likely_positive(state, 4))
    margin = np.where(np.asarray(state.labels) < 0, -np.abs(np.asarray(state.scores)), -np.inf)
    assert not np.array_equal(np.sort(ids, axis=1), np.sort(np.argsort(-margin)[:, :4], axis=1))
  assert all(np.asarray(state.pseudo_negative).any() for state, _ in steps[1:])  # as ours
  assert engine.compilations() == 1  # other seeds: the same compiled query


def test_random_never_requeries_and_is_exact_per_seed(problem, tmp_path):
  features, seed_ids, truth = problem
  engine = runner.Engine(runner.loop_config(base_config(batch_size=4), "random"))
  state = loop.init(features, seed_ids, seed=0)
  # Only 5 images per category left unlabeled: every query lies among them, each one drawn.
  left = np.stack([np.arange(100, 105), np.arange(200, 205)])
  labels = np.zeros((2, POOL), np.int8)
  labels[np.arange(2)[:, None], left] = -1
  state = state.replace(labels=jnp.asarray(labels))
  seen = set()
  for seed in range(20):
    ids = np.asarray(engine.query(state.replace(seed=jnp.uint32(seed))))
    assert np.isin(ids, left).all(axis=None) and all(len(set(row)) == 4 for row in ids)
    seen.update(ids[0].tolist())
  assert seen == set(left[0].tolist())
  # Over rounds no image is asked twice; the same seed asks the same, another seed others.
  steps, _ = run_loop("random", problem, 6)
  asked = np.concatenate([ids for _, ids in steps], axis=1)
  assert all(len(set(row)) == row.size for row in asked)
  again, _ = run_loop("random", problem, 6)
  np.testing.assert_array_equal(asked, np.concatenate([ids for _, ids in again], axis=1))
  assert not np.array_equal(
    engine.query(steps[2][0]), engine.query(steps[2][0].replace(seed=jnp.uint32(1)))
  )
  # Resumed after round 2, the run ends in exactly the state of an uninterrupted one; replay
  # (checkpoint 0 plus the recorded answers) recomputes every query.
  config = base_config(batch_size=4, rounds_per_update=4)

  def run(name, **kwargs):
    return runner.run_strategy(
      run_dir=str(tmp_path / name),
      config=config,
      strategy="random",
      features=features,
      val_features=features,
      seed_ids=seed_ids,
      val_ground_truth=truth,
      labeler=labelers.SimulatedLabeler(truth),
      log=quiet,
      engine=engine,
      **kwargs,
    )

  whole = run("whole")
  run("resumed", stop_after=2)
  resumed = run("resumed")
  assert [r["positives_found"] for r in resumed] == [r["positives_found"] for r in whole]
  for name in ("whole", "resumed"):
    answers = [json.loads(line) for line in (tmp_path / name / "answers.jsonl").open()]
    assert len(answers) == 4
  assert (tmp_path / "whole" / "answers.jsonl").read_text() == (
    tmp_path / "resumed" / "answers.jsonl"
  ).read_text()
  for name in ("whole", "resumed"):
    assert runner.replay_strategy(
      run_dir=str(tmp_path / name),
      config=config,
      strategy="random",
      features=features,
      seed_ids=seed_ids,
      log=quiet,
    )


# ----------------------------------------------------------------------------------------------
# Pseudo-labels: KD-Semi thresholds, DeepProp propagation, weights in the loss.


def test_kd_semi_pseudo_positives_respect_the_threshold():
  labels = np.full((2, 6), -1, np.int8)
  labels[0, 0] = 1
  labels[1, 5] = 0
  probabilities = np.array(
    [[0.99, 0.98, 0.97, 0.5, 0.985, 0.2], [0.1, 0.95, 0.91, 0.89, 0.3, 0.99]], np.float32
  )
  w_n = np.zeros((2, 6), bool)
  w_n[0, [1, 3]] = True  # image 1 is confident: it becomes a pseudo-positive instead
  out = strategies.kd_semi_labels(labels, w_n, probabilities, threshold=0.98)
  np.testing.assert_array_equal(out.positive[0], [0, 1, 0, 0, 1, 0])  # labeled image 0 excluded
  np.testing.assert_array_equal(out.positive[1], [0, 0, 0, 0, 0, 0])  # labeled image 5 excluded
  np.testing.assert_array_equal(out.negative[0], [0, 0, 0, 1, 0, 0])
  assert out.weights is None
  loose = strategies.kd_semi_labels(labels, w_n, probabilities, threshold=0.9)
  np.testing.assert_array_equal(loose.positive[1], [0, 1, 1, 0, 0, 0])
  capped = strategies.kd_semi_labels(labels, w_n, probabilities, threshold=0.9, cap=1)
  np.testing.assert_array_equal(capped.positive[0], [0, 0, 0, 0, 1, 0])  # the most confident
  first = strategies.kd_semi_labels(labels, w_n, None, threshold=0.9)
  assert not first.positive.any()  # no previous deep model at the first update


def test_kd_semi_labeler_reads_the_previous_models_pool_probabilities():
  probabilities = np.array([[0.99, 0.5, 0.97], [0.2, 0.96, 0.3]], np.float32)  # [C, P]

  class FakeUpdater:
    def pool_store(self, version):
      assert version == 1
      return {"main_probs": probabilities.T}

  spec = runner.STRATEGIES["kd_semi_0.95"]
  labeler = strategies.pseudo_labeler(spec, base_config())
  state = loop.LoopState(
    round=None,
    seed=None,
    labels=np.full((2, 3), -1, np.int8),
    label_round=None,
    pseudo_negative=np.zeros((2, 3), bool),
    linear=None,
    has_model=None,
    scores=None,
  )
  out = labeler(FakeUpdater(), state, 2)
  np.testing.assert_array_equal(out.positive, [[1, 0, 1], [0, 1, 0]])
  assert strategies.pool_outputs(spec) == ("embedding", "main_probs")
  assert strategies.pool_outputs(runner.STRATEGIES["ours"]) == ("embedding",)


def test_deep_prop_propagates_labels_along_the_graph():
  # A chain of 40 points on a quarter circle: each image's nearest neighbours are the next
  # ones along it. One labeled positive at one end, one labeled negative at the other.
  angles = np.linspace(0, np.pi / 2, 40)
  features = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
  labels = np.full((1, 40), -1, np.int8)
  labels[0, 0], labels[0, 39] = 1, 0
  out = strategies.deep_prop_labels(
    jnp.asarray(features), labels, np.zeros((1, 40), bool), k=2, iterations=60
  )
  positive = out.positive[0]
  assert positive[1:8].all()  # reached through several hops, not only direct neighbours
  assert not positive[32:].any() and not positive[[0, 39]].any()
  assert (out.weights[0, 1:8] > 0).all() and (out.weights[0, 1:8] <= 1).all()
  first_negative = int(np.argmin(positive[1:])) + 1
  assert 10 <= first_negative <= 30  # the boundary lies between the two seeds
  # W_n: those propagated positive become pseudo-positives; the others keep their weight.
  w_n = np.zeros((1, 40), bool)
  w_n[0, [3, 35]] = True
  out = strategies.deep_prop_labels(jnp.asarray(features), labels, w_n, k=2, iterations=60)
  assert out.positive[0, 3] and not out.negative[0, 3] and out.negative[0, 35]
  capped = strategies.deep_prop_labels(
    jnp.asarray(features), labels, w_n, k=2, iterations=60, cap=2
  )
  assert capped.positive.sum() == 2 and capped.positive[0, 1]  # the most confident: closest


def test_deep_prop_weighs_pseudo_labels_by_certainty_and_class_balance():
  # Iscen et al.'s loss: a pseudo-label of class j weighs omega (its certainty) * zeta_j, zeta_j
  # = (n / 2) / n_j over the training set's class populations (human + pseudo-labels).
  angles = np.linspace(0, np.pi / 2, 40)
  features = jnp.asarray(np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32))
  labels = np.full((1, 40), -1, np.int8)
  labels[0, 0], labels[0, 39] = 1, 0
  w_n = np.zeros((1, 40), bool)
  w_n[0, 30:36] = True
  out = strategies.deep_prop_labels(features, labels, w_n, k=2, iterations=60)
  neighbors, affinities = pseudo_labels.knn_graph(features, k=2)
  scores = pseudo_labels.propagate(neighbors, affinities, jnp.asarray(labels), iterations=60)
  _, negative, omega = (
    np.asarray(x)[0] for x in pseudo_labels.deep_prop_pseudo_labels(scores, labels < 0)
  )
  positive, pseudo_negative, weights = out.positive[0], out.negative[0], out.weights[0]
  np.testing.assert_array_equal(pseudo_negative, w_n[0])  # all six far from the positive seed
  num_positive, num_negative = 1 + positive.sum(), 1 + pseudo_negative.sum()  # + human labels
  assert num_positive > 2 * num_negative  # unbalanced: zeta matters
  total = num_positive + num_negative
  np.testing.assert_allclose(
    weights[positive], omega[positive] * (total / 2) / num_positive, rtol=1e-4, atol=1e-6
  )
  certainty = np.where(negative, omega, 1.0)[pseudo_negative]
  np.testing.assert_allclose(
    weights[pseudo_negative], certainty * (total / 2) / num_negative, rtol=1e-4, atol=1e-6
  )


def test_weighted_bce_hand_computed_and_unweighted_by_default():
  logits = jnp.array([[0.0, 2.0], [-1.0, 0.5]])
  labels = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  mask = jnp.array([[True, True], [False, True]])
  weights = jnp.array([[0.5, 2.0], [7.0, 0.0]])

  def bce(z, y):
    return -(y * np.log(1 / (1 + np.exp(-z))) + (1 - y) * np.log(1 - 1 / (1 + np.exp(-z))))

  expected = np.array([[0.5 * bce(0.0, 1), 2.0 * bce(2.0, 0)], [0.0, 0.0]])
  np.testing.assert_allclose(
    losses.masked_sigmoid_bce(logits, labels, mask, weights), expected, rtol=1e-6
  )
  unweighted = losses.masked_sigmoid_bce(logits, labels, mask)
  np.testing.assert_array_equal(
    unweighted, losses.masked_sigmoid_bce(logits, labels, mask, jnp.ones((2, 2)))
  )
  aux = jnp.zeros((2, 3))
  loss, metrics = losses.bgsplit_loss(
    logits, labels, mask, aux, jnp.array([0, 1]), jnp.array([True, True]), label_weights=weights
  )
  np.testing.assert_allclose(metrics["bce"], expected.sum() / 3, rtol=1e-6)  # mean over labels
  with pytest.raises(ValueError, match="weights of shape"):
    losses.masked_sigmoid_bce(logits, labels, mask, jnp.ones((2, 3)))
  loss0, _ = losses.bgsplit_loss(
    logits, labels, mask, aux, jnp.array([0, 1]), jnp.array([True, True]), aux_weight=0.0
  )
  np.testing.assert_allclose(loss0, float(unweighted.sum()) / 3, rtol=1e-6)  # no aux term


def test_training_set_with_weighted_pseudo_positives():
  labels = np.array([[1, 0, -1, -1, -1], [-1, -1, 1, -1, -1]], np.int8)
  w_n = np.array([[0, 0, 1, 1, 0], [1, 0, 0, 1, 0]], bool)
  positive = np.array([[0, 0, 1, 0, 0], [0, 1, 1, 0, 0]], bool)  # [1, 2] is labeled: ignored
  weights = np.full((2, 5), 0.25, np.float32)
  examples = updates.training_set(
    labels, w_n, np.arange(5), pseudo_positive=positive, pseudo_weights=weights
  )
  np.testing.assert_array_equal(examples.pool_positions, [0, 1, 2, 3])
  np.testing.assert_array_equal(examples.labels.T, [[1, 0, 1, 0], [0, 1, 1, 0]])
  np.testing.assert_array_equal(examples.label_mask.T, [[1, 1, 1, 1], [1, 1, 1, 1]])
  np.testing.assert_array_equal(
    examples.label_weights.T, [[1, 1, 0.25, 0.25], [0.25, 0.25, 1, 0.25]]
  )
  plain = updates.training_set(labels, w_n, np.arange(5))
  assert plain.label_weights is None
  np.testing.assert_array_equal(plain.labels.T, [[1, 0, 0, 0], [0, 0, 1, 0]])


# ----------------------------------------------------------------------------------------------
# Deep strategies on a tiny image task, through RunContext.updater.


@pytest.fixture(scope="module")
def context(tmp_path_factory):
  root = tmp_path_factory.mktemp("strategies")
  train_labels = np.repeat(np.arange(10), 50)
  eval_labels = np.repeat(np.arange(10), 15)
  task = tasks.make_task(
    train_labels, eval_labels, dataset="synthetic", categories=(3, 6), seed=0, pool_fraction=0.06
  )
  data = updates.ImageData(
    train=(synthetic_images(train_labels, 1), train_labels),
    eval=(synthetic_images(eval_labels, 2), eval_labels),
  )
  settings = updates.DeepSettings(
    model="resnet_tiny", batch_size=32, embed_batch_size=128, pretrain_epochs=1, epochs=1
  )
  return workdirs.m_pre_context(str(root), base_config(), task, data, settings, log=quiet)


def run_deep(context, name):
  return runner.run_strategy(
    run_dir=os.path.join(context.workdir, name),
    config=context.config,
    strategy=name,
    features=context.features,
    val_features=context.val_features,
    seed_ids=context.task.seed_positives,
    val_ground_truth=context.task.val_ground_truth(),
    labeler=labelers.SimulatedLabeler(context.task.ground_truth()),
    updater=context.updater(name, log=quiet),
    log=quiet,
  )


def pseudo_label_record(context, name, version=1):
  with open(os.path.join(context.workdir, name, "deep", f"v{version}_pseudo_labels.json")) as f:
    return json.load(f)


def test_background_splitting_weight_per_strategy(context):
  weights = {
    name: context.updater(name, log=quiet).settings.aux_weight
    for name, spec in runner.STRATEGIES.items()
    if spec["deep_updates"]
  }
  assert weights["no_bg_split"] == 0.0 and weights["tropel_deep"] == 0.0
  assert weights["ours"] == 0.1 and weights["kd_semi"] == 0.1 and weights["deep_prop"] == 0.1
  assert context.updater("ours_linear") is None and context.updater("tropel") is None
  fully = context.updater("fully_supervised", log=quiet).settings
  assert fully.epochs == 1 and fully.aux_weight == 0.1  # config.fully_supervised_epochs


def test_tropel_deep_trains_on_human_labels_only(context):
  records = run_deep(context, "tropel_deep")
  assert "deep" in records[-1]
  pseudo = pseudo_label_record(context, "tropel_deep")
  assert pseudo["num_pseudo_negatives"] == [0, 0] and pseudo["num_pseudo_positives"] == [0, 0]
  assert records[-1]["deep"]["pseudo_labels"] == pseudo  # recorded for Figure 4


def test_deep_prop_trains_on_weighted_propagated_labels(context, monkeypatch):
  # Features where each category's positives cluster (M_pre's on this toy task do not), so
  # propagation from the first round's labels finds unlabeled positives.
  truth = context.task.ground_truth()
  planted = np.array(context.features)
  planted[:, :2] += 6.0 * truth.T
  context = dataclasses.replace(context, features=jnp.asarray(planted))
  seen = []
  real = updates.bgsplit_update

  def spy(**kwargs):
    seen.append(kwargs["examples"])
    return real(**kwargs)

  monkeypatch.setattr(updates, "bgsplit_update", spy)
  records = run_deep(context, "deep_prop")
  pseudo = records[-1]["deep"]["pseudo_labels"]
  assert all(n > 0 for n in pseudo["num_pseudo_positives"])
  assert all(n > 0 for n in pseudo["num_pseudo_negatives"])  # W_n, as in ours
  assert all(0.0 <= v < 0.5 for v in pseudo["pseudo_positive_fpr"])  # planted: mostly right
  (examples,) = seen
  assert examples.label_weights is not None  # certainty weights reach the loss
  weights = examples.label_weights[examples.label_mask]
  assert (weights > 0).all() and (weights != 1).any()
  for c in range(2):  # class balance: the rarer class (positives) weighs more per label
    mask, positive = examples.label_mask[:, c], examples.labels[:, c] == 1
    assert mask[positive].sum() < mask[~positive].sum()
    per_class = examples.label_weights[:, c]
    assert per_class[mask & positive].mean() > 1 > per_class[mask & ~positive].mean()
  positives = examples.labels.sum(axis=0)
  assert (positives > 5).all()  # more positives than the human-labeled ones


def test_fully_supervised_uses_every_label(context, monkeypatch):
  seen = []
  real = updates.bgsplit_update

  def spy(**kwargs):
    seen.append(kwargs["examples"])
    return real(**kwargs)

  monkeypatch.setattr(updates, "bgsplit_update", spy)
  run_dir = os.path.join(context.workdir, "fully_supervised")
  records = strategies.run_fully_supervised(run_dir=run_dir, context=context, log=quiet)
  (examples,) = seen
  truth = context.task.ground_truth()
  np.testing.assert_array_equal(examples.pool_positions, np.arange(context.task.pool_size))
  assert examples.label_mask.all()  # every (image, category) has its label
  np.testing.assert_array_equal(examples.labels.T, truth.astype(np.float32))
  (record,) = records
  assert record["labels_per_category"] == context.task.pool_size and 0 <= record["mean_f1"] <= 1
  # Finished: a second call trains nothing and returns the same record.
  again = strategies.run_fully_supervised(run_dir=run_dir, context=context, log=quiet)
  assert len(seen) == 1 and again[0]["mean_f1"] == record["mean_f1"]
  with pytest.raises(ValueError, match="runs no loop"):
    run_deep(context, "fully_supervised")


def test_updater_settings_are_copies(context):
  base = context.deep_parts["settings"]
  context.updater("no_bg_split", log=quiet)
  assert base.aux_weight == 0.1 and dataclasses.replace(base) == base
  assert jax.device_count() == 8
