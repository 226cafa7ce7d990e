"""The active loop on synthetic features: transitions, no retrace, checkpoints, bad input,
run directories that refuse to resume with other features or settings."""

import json
import math
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from rare_jax import workdirs
from rare_jax.active import labelers, linear, loop, runner, select
from rare_jax.infra import sharding
from rare_jax.infra.checkpoint import CheckpointStore

POOL, DIM, CATEGORIES, SEEDS = 600, 8, 2, 5


@pytest.fixture(scope="module")
def problem():
  """Two rare categories, 3% of the pool each, separable-ish in 8 dims."""
  rng = np.random.default_rng(0)
  truth = np.zeros((CATEGORIES, POOL), bool)
  truth[0, :18] = True
  truth[1, 18:36] = True
  features = rng.normal(size=(POOL, DIM)).astype(np.float32)
  features[:18, 0] += 3.0
  features[18:36, 1] += 3.0
  seed_ids = np.stack([np.arange(SEEDS), 18 + np.arange(SEEDS)]).astype(np.int32)
  return jnp.asarray(features), seed_ids, truth


@pytest.fixture(scope="module")
def engines():
  return {
    "adaptive": runner.Engine(
      loop.LoopConfig(batch_size=4, querying="adaptive", pseudo_negative_factor=2.0, l2=1.0)
    ),
    "tropel": runner.Engine(
      loop.LoopConfig(
        batch_size=4, querying="most_likely_positive", pseudo_negative_factor=0.0, l2=1.0
      )
    ),
  }


def run_rounds(engine, problem, rounds, seed=0):
  features, seed_ids, truth = problem
  labeler = labelers.SimulatedLabeler(truth)
  state = loop.init(features, seed_ids, seed=seed)
  states = [state]
  for _ in range(rounds):
    ids = np.asarray(engine.query(state))
    state = engine.step(state, ids, labeler.answer(ids), features)
    states.append(state)
  return states


def test_init_labels_seeds_and_ranks_by_cosine(problem):
  features, seed_ids, _ = problem
  state = loop.init(features, seed_ids, seed=0)
  labels = np.asarray(state.labels)
  assert labels.dtype == np.int8 and labels.shape == (CATEGORIES, POOL)
  assert (labels == 1).sum() == CATEGORIES * SEEDS and (labels == 0).sum() == 0
  np.testing.assert_array_equal(state.scores, select.cosine_scores(features, jnp.asarray(seed_ids)))
  assert not bool(state.has_model) and int(state.round) == 0


def test_rounds_record_labels_pseudo_negatives_and_never_requery(problem, engines):
  features, seed_ids, truth = problem
  states = run_rounds(engines["adaptive"], problem, 4)
  asked = set()
  for before, after in zip(states[:-1], states[1:], strict=True):
    new = np.argwhere((np.asarray(before.labels) < 0) & (np.asarray(after.labels) >= 0))
    assert len(new) == CATEGORIES * 4  # exactly B new labels per category
    for c, p in new:
      assert (c, p) not in asked  # never re-queried
      asked.add((c, p))
      assert np.asarray(after.labels)[c, p] == truth[c, p]  # the answer is recorded
      assert np.asarray(after.label_round)[c, p] == int(after.round)
    labels = np.asarray(after.labels)
    pseudo = np.asarray(after.pseudo_negative)
    assert not np.any(pseudo & (labels >= 0))  # never a labeled image
    num_positive, num_negative = (labels == 1).sum(1), (labels == 0).sum(1)
    expected = [round(2.0 * (p + 0.1 * n)) for p, n in zip(num_positive, num_negative, strict=True)]
    np.testing.assert_array_equal(pseudo.sum(1), expected)
    # Drawn from the bottom half of the ranking *before* this round's fit.
    scores = np.asarray(before.scores)
    for c in range(CATEGORIES):
      unlabeled = np.flatnonzero(labels[c] < 0)
      cutoff = np.sort(scores[c, unlabeled])[len(unlabeled) // 2 - 1]
      assert np.all(scores[c, pseudo[c]] <= cutoff)
  assert bool(states[-1].has_model)


def test_adaptive_rule_switches_to_margin(problem, engines):
  features, seed_ids, truth = problem
  engine = engines["adaptive"]
  for state in run_rounds(engine, problem, 4)[1:]:
    labels = np.asarray(state.labels)
    ids = np.asarray(engine.query(state))
    scores = np.asarray(state.scores)
    for c in range(CATEGORIES):
      unlabeled = labels[c] < 0
      if (labels[c] == 1).sum() < (labels[c] == 0).sum():
        expected = np.sort(scores[c, unlabeled])[::-1][:4]
        np.testing.assert_allclose(np.sort(scores[c, ids[c]])[::-1], expected)
      else:
        expected = np.sort(np.abs(scores[c, unlabeled]))[:4]
        np.testing.assert_allclose(np.sort(np.abs(scores[c, ids[c]])), expected)


def test_tropel_never_pseudo_labels_and_queries_top(problem, engines):
  engine = engines["tropel"]
  for state in run_rounds(engine, problem, 3):
    assert not np.asarray(state.pseudo_negative).any()
    ids = np.asarray(engine.query(state))
    scores = np.where(np.asarray(state.labels) < 0, np.asarray(state.scores), -np.inf)
    for c in range(CATEGORIES):
      np.testing.assert_allclose(np.sort(scores[c, ids[c]]), np.sort(scores[c])[-4:])


@pytest.fixture(scope="module")
def positives_first():
  """Category 0's cosine top is all positives (at the end of the pool, so pool order differs);
  category 1's first batch holds a negative."""
  rng = np.random.default_rng(0)
  truth = np.zeros((CATEGORIES, 300), bool)
  truth[0, 280:292] = True
  truth[1, ::25] = True
  features = rng.normal(size=(300, DIM)).astype(np.float32)
  features[280:292, 0] += 6.0
  features[::25, 1] += 1.0
  seed_ids = np.stack([280 + np.arange(SEEDS), 25 * np.arange(SEEDS)]).astype(np.int32)
  return jnp.asarray(features), seed_ids, truth


@pytest.mark.parametrize("querying", ["most_likely_positive", "adaptive"])  # Tropel, No-Pseudo-Neg
def test_one_class_category_keeps_the_cosine_ranking_until_a_negative(positives_first, querying):
  features, seed_ids, truth = positives_first
  engine = runner.Engine(
    loop.LoopConfig(batch_size=4, querying=querying, pseudo_negative_factor=0.0)
  )
  labeler = labelers.SimulatedLabeler(truth)
  start = loop.init(features, seed_ids, seed=0)
  cosine = np.asarray(start.scores)
  ids = np.asarray(engine.query(start))
  answers = labeler.answer(ids)
  assert answers[0].all() and not answers[1].all()
  first = engine.step(start, ids, answers, features)
  # Category 0 has one class: no model (a fit would be degenerate), its ranking kept exactly.
  np.testing.assert_array_equal(loop.fitted(first), [False, True])
  np.testing.assert_array_equal(first.scores[0], cosine[0])
  assert not np.asarray(first.linear.weights[0]).any() and float(first.linear.bias[0]) == 0.0
  assert np.asarray(first.linear.weights[1]).any()
  assert not np.array_equal(first.scores[1], cosine[1])
  # Its next queries follow the cosine ranking (most likely positive), not pool order.
  ids = np.asarray(engine.query(first))
  unlabeled = np.asarray(first.labels[0]) < 0
  top = np.argsort(-np.where(unlabeled, cosine[0], -np.inf), kind="stable")[:4]
  np.testing.assert_array_equal(np.sort(ids[0]), np.sort(top))
  assert (ids[0] >= 280).sum() == 3  # three of the remaining positives
  answers = labeler.answer(ids)
  assert not answers[0].all()
  # A negative arrived: a model is fitted and ranks the pool (many distinct scores).
  second = engine.step(first, ids, answers, features)
  np.testing.assert_array_equal(loop.fitted(second), [True, True])
  assert np.abs(np.asarray(second.linear.weights[0])).max() > 0.1
  assert len(np.unique(np.asarray(second.scores[0]))) > 250
  assert engine.compilations() == 2


def test_refit_keeps_the_cosine_ranking_of_one_class_categories(positives_first):
  features, seed_ids, truth = positives_first
  engine = runner.Engine(
    loop.LoopConfig(batch_size=4, querying="most_likely_positive", pseudo_negative_factor=0.0)
  )
  start = loop.init(features, seed_ids, seed=0)
  ids = np.asarray(engine.query(start))
  state = engine.step(start, ids, labelers.SimulatedLabeler(truth).answer(ids), features)
  assert np.asarray(loop.fitted(state)).tolist() == [False, True]
  rotation = np.linalg.qr(np.random.default_rng(1).normal(size=(DIM, DIM)))[0]
  new_features = jnp.asarray(np.asarray(features) @ rotation.astype(np.float32) + 0.5)
  refitted = engine.refit_on(state, new_features)
  np.testing.assert_array_equal(loop.fitted(refitted), [False, True])
  assert not np.asarray(refitted.linear.weights[0]).any() and float(refitted.linear.bias[0]) == 0
  # The cosine ranking to the seeds on the new features (the old scores are in another space).
  np.testing.assert_allclose(
    refitted.scores[0], select.cosine_scores(new_features, jnp.asarray(seed_ids))[0], atol=1e-6
  )
  assert not np.allclose(refitted.scores[0], state.scores[0], atol=1e-3)
  np.testing.assert_allclose(
    refitted.scores[1],
    np.asarray(linear.decision_function(new_features, refitted.linear)).T[1],
    rtol=1e-6,
  )
  assert np.asarray(refitted.linear.weights[1]).any()


def test_no_retrace_across_rounds(problem):
  engine = runner.Engine(
    loop.LoopConfig(batch_size=4, querying="most_likely_positive", pseudo_negative_factor=0.0)
  )
  run_rounds(engine, problem, 2)
  warm = engine.compilations()
  run_rounds(engine, problem, 6, seed=3)  # later rounds, more labels, same bucket
  assert engine.compilations() == warm == 2


def test_reused_training_rows_are_donated_and_change_no_state(problem, engines):
  """On CPU the engine keeps each round's gathered training rows and donates them to the next
  round (no fresh [C, size, D] allocation): the states are those of an engine that allocates
  them anew, also across a bucket change (a new buffer then) and after `release_rows`."""
  features, seed_ids, truth = problem
  reusing = engines["adaptive"]
  fresh = runner.Engine(reusing.config, reuse_rows=False)
  assert reusing.reuse_rows and not fresh.reuse_rows  # CPU default: on
  runs = []
  for engine in (reusing, fresh):
    labeler = labelers.SimulatedLabeler(truth)
    state, states, kept = loop.init(features, seed_ids, seed=0), [], []
    for round_index in range(7):
      if round_index == 5:
        engine.release_rows()
      ids = np.asarray(engine.query(state))
      state = engine.step(state, ids, labeler.answer(ids), features)
      states.append(state)
      kept.append(engine._rows)
    runs.append((states, kept))
  (reused_states, reused_rows), (fresh_states, fresh_rows) = runs
  for round_index, (a, b) in enumerate(zip(reused_states, fresh_states, strict=True)):
    assert runner.differing_leaves(a, b) == [], round_index
  assert all(rows is None for rows in fresh_rows)
  sizes = [rows.shape[1] for rows in reused_rows]
  assert len(set(sizes)) > 1, sizes  # the run crossed a bucket: a new buffer was allocated
  for round_index in range(6):
    same_bucket = sizes[round_index] == sizes[round_index + 1]
    released = round_index + 1 == 5
    # A buffer the next round could use was donated to it (deleted here); otherwise kept.
    assert reused_rows[round_index].is_deleted() == (same_bucket and not released), round_index
  assert not reused_rows[-1].is_deleted()
  with pytest.raises(ValueError, match="reuse_rows"):
    runner.Engine(reusing.config, reuse_rows="yes")


def test_same_seed_same_run_other_seed_other_pseudo_negatives(problem, engines):
  a = run_rounds(engines["adaptive"], problem, 2, seed=0)[-1]
  b = run_rounds(engines["adaptive"], problem, 2, seed=0)[-1]
  c = run_rounds(engines["adaptive"], problem, 2, seed=1)[-1]
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a.pseudo_negative, c.pseudo_negative)


def test_checkpoint_round_trip_is_exact(problem, engines, tmp_path):
  features, seed_ids, _ = problem
  state = run_rounds(engines["adaptive"], problem, 2)[-1]
  with CheckpointStore(tmp_path / "ck") as store:
    store.save(2, state, {"round": 2})
    with pytest.raises(ValueError, match="already exists"):
      store.save(2, state)
    restored, meta = store.restore(2, runner.abstract_state(features, seed_ids, 0))
  assert meta == {"round": 2}
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(batch_size=0), "batch_size"),
    (dict(pseudo_negative_factor=-1.0), "pseudo_negative_factor"),
    (dict(querying="uncertainty"), "querying"),
    (dict(l2=0.0), "l2"),
  ],
)
def test_bad_loop_config(kwargs, match):
  with pytest.raises(ValueError, match=match):
    loop.LoopConfig(**kwargs)


def test_bad_features():
  with pytest.raises(ValueError, match="NaN/inf in 1 rows"):
    workdirs.check_features(np.array([[0.0, 1.0], [np.nan, 0.0]], np.float32), 2, "pool")
  with pytest.raises(ValueError, match=r"must be \[3, D\]"):
    workdirs.check_features(np.zeros((2, 4), np.float32), 3, "pool")


def test_answers_for_unqueried_ids_are_refused():
  query_ids = np.array([[3, 7], [1, 2]])
  with pytest.raises(ValueError, match="not queried"):
    labelers.check_answers(query_ids, np.array([[3, 8], [1, 2]]), np.ones((2, 2), bool))
  with pytest.raises(ValueError, match="more than once"):
    labelers.check_answers(query_ids, np.array([[3, 3], [1, 2]]), np.ones((2, 2), bool))
  aligned = labelers.check_answers(
    query_ids, np.array([[7, 3], [1, 2]]), np.array([[True, False], [False, True]])
  )
  np.testing.assert_array_equal(aligned, [[False, True], [False, True]])


def test_workdir_of_another_config_is_refused(tmp_path):
  runner.write_config(str(tmp_path), {"seed": 0, "batch_size": 10})
  runner.write_config(str(tmp_path), {"seed": 0, "batch_size": 10})  # same: accepted
  with pytest.raises(ValueError, match=r"another config \(differs in \['batch_size'\]\)"):
    runner.write_config(str(tmp_path), {"seed": 0, "batch_size": 20})
  assert json.loads((tmp_path / "config.json").read_text())["batch_size"] == 10  # untouched


def test_seed_ids_outside_the_pool_are_refused(problem, tmp_path):
  features, seed_ids, truth = problem
  # Indexing would wrap -1 to the last image and clamp 600 to it: refused, naming the ids.
  with pytest.raises(ValueError, match=r"in \[0, 600\), got 2 outside: \[-1, 600\]"):
    loop.init(features, np.array([[0, 1, 600], [18, 19, -1]]), seed=0)
  with pytest.raises(ValueError, match="integer pool positions"):
    loop.init(features, seed_ids.astype(np.float32), seed=0)
  with pytest.raises(ValueError, match=r"\[C, K\]"):
    loop.init(features, seed_ids[0], seed=0)
  dataset_ids = seed_ids * 100 + 7  # e.g. RareTask.seed_ids() instead of seed_positives
  with pytest.raises(
    ValueError, match=r"got 5 outside: \[1807, 1907, 2007, 2107, 2207\] \(dataset ids"
  ):
    run_ours_linear(problem, tmp_path / "bad", seed_ids=dataset_ids)
  assert not (tmp_path / "bad").exists()  # refused before anything was written


def loop_run_config(**overrides):
  values = dict(
    seed=0,
    batch_size=4,
    pseudo_negative_factor=2.0,
    l2=1.0,
    solver_max_iters=200,
    solver_tol=1e-6,
    num_feature_updates=1,
    rounds_per_update=3,
  )
  values.update(overrides)
  return ml_collections.ConfigDict(values)


def run_ours_linear(problem, run_dir, *, config=None, features=None, seed_ids=None, **kwargs):
  pool, seeds, truth = problem
  features = pool if features is None else features
  return runner.run_strategy(
    run_dir=str(run_dir),
    config=loop_run_config() if config is None else config,
    strategy="ours_linear",
    features=features,
    val_features=features,
    seed_ids=seeds if seed_ids is None else seed_ids,
    val_ground_truth=truth,
    labeler=labelers.SimulatedLabeler(truth),
    **{"log": lambda _: None, **kwargs},
  )


def _final_state(problem, run_dir):
  features, seed_ids, _ = problem
  with CheckpointStore(run_dir / "checkpoints") as store:
    return store.restore(store.latest_step(), runner.abstract_state(features, seed_ids, 0))[0]


def test_run_dir_of_other_features_or_settings_is_refused(problem, engines, tmp_path):
  features, _, _ = problem
  engine = engines["adaptive"]  # ours_linear's LoopConfig under loop_run_config()
  run_ours_linear(problem, tmp_path / "whole", engine=engine)
  run_dir = tmp_path / "stopped"
  run_ours_linear(problem, run_dir, engine=engine, stop_after=2)
  files = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
  refused = [
    (dict(config=loop_run_config(l2=2.0)), r"differs in l2: 1\.0 in the run, 2\.0 now"),
    (dict(config=loop_run_config(seed=1)), r"differs in seed: 0 in the run, 1 now"),
    (dict(config=loop_run_config(batch_size=5)), r"differs in batch_size: 4 in the run, 5 now"),
    (dict(features=features.at[:, 0].add(1.0)), r"differs in features: .*; val_features: "),
    (dict(features=features[:, :7]), r"'shape': \[600, 8\].* in the run, .*'shape': \[600, 7\]"),
  ]
  for kwargs, match in refused:
    with pytest.raises(
      ValueError, match=f"{re.escape(str(run_dir))} was started with other settings.*{match}"
    ):
      run_ours_linear(problem, run_dir, **kwargs)
  # A run started by code that draws or fits differently (no loop_version there: version 1).
  path = run_dir / "fingerprint.json"
  older = json.loads(path.read_text())
  del older["loop_version"]
  path.write_text(json.dumps(older))
  match = rf"differs in loop_version: None in the run, {loop.LOOP_VERSION} now"
  with pytest.raises(ValueError, match=match):
    run_ours_linear(problem, run_dir, engine=engine)
  path.write_bytes(files[path])
  assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == files  # untouched
  # The same settings resume exactly, also in a directory from before fingerprints.
  (run_dir / "fingerprint.json").unlink()
  lines = []
  run_ours_linear(problem, run_dir, engine=engine, log=lines.append)
  assert any("resuming from round 2" in line for line in lines)
  assert (run_dir / "fingerprint.json").read_bytes() == files[run_dir / "fingerprint.json"]
  assert (
    runner.differing_leaves(
      _final_state(problem, run_dir), _final_state(problem, tmp_path / "whole")
    )
    == []
  )
  assert int(_final_state(problem, run_dir).round) == 3


@pytest.fixture(scope="module")
def sharded_engine(engines):
  """engines["adaptive"]'s loop with the pool split over 8 devices."""
  return runner.Engine(engines["adaptive"].config, mesh=sharding.make_mesh([("data", 8)]))


def test_pool_sharded_over_8_devices_gives_the_one_device_run_bit_for_bit(
  problem, engines, sharded_engine
):
  """query/observe/refit with the pool split over a mesh's data axis: each device holds P/8 of
  the features and of every [C, P] array, and every state equals the one-device run's."""
  features, seed_ids, truth = problem
  single, sharded = engines["adaptive"], sharded_engine
  rotation = np.linalg.qr(np.random.default_rng(1).normal(size=(DIM, DIM)))[0]
  new_features = jnp.asarray(np.asarray(features) @ rotation.astype(np.float32) + 0.5)
  runs = []
  for engine in (single, sharded):
    labeler = labelers.SimulatedLabeler(truth)
    pool = engine.place_features(features)
    state = engine.init(pool, seed_ids, seed=0)
    states = [state]
    for round_index in range(1, 5):
      ids = np.asarray(engine.query(state))
      state = engine.step(state, ids, labeler.answer(ids), pool)
      if round_index == 2:  # a deep update's new features: refit and rescore
        pool = engine.place_features(new_features)
        state = engine.refit_on(state, pool)
      states.append(state)
    runs.append((states, pool))
  (one, _), (split, pool) = runs
  assert pool.sharding.spec == jax.sharding.PartitionSpec("data", None)
  assert {s.data.shape for s in pool.addressable_shards} == {(POOL // 8, DIM)}
  for name in ("labels", "label_round", "pseudo_negative", "scores"):
    array = getattr(split[-1], name)
    assert len(array.addressable_shards) == 8, name
    assert {s.data.shape for s in array.addressable_shards} == {(CATEGORIES, POOL // 8)}, name
  assert np.asarray(split[-1].labels >= 0).sum() > CATEGORIES * (SEEDS + 4 * 4 - 1)
  for round_index, (a, b) in enumerate(zip(one, split, strict=True)):
    assert runner.differing_leaves(a, b) == [], round_index
  with pytest.raises(ValueError, match="not a multiple of the 8 devices"):
    sharded.place_features(features[:-4])


def _collective_shapes(hlo_text: str, op: str) -> list[tuple[int, ...]]:
  """Shapes of the arrays that a compiled program's `op` collectives (e.g. "all-gather")
  produce, from its HLO text (a combined collective yields one shape per operand)."""
  shapes = []
  for line in hlo_text.splitlines():
    match = re.search(rf"= (.*?) {op}(?:-start)?\(", line)
    if match:
      for dims in re.findall(r"\[([\d,]*)\]", match.group(1)):
        shapes.append(tuple(int(d) for d in dims.split(",") if d))
  return shapes


def test_sharded_engine_never_gathers_the_pool_on_one_device():
  """Compiled for 8 devices, query, observe and refit all-gather nothing that grows with the
  pool: the radix selection histograms each shard and sums the counts ([C, 65536] all-reduces),
  the training-set and tie positions are found shard by shard, the top-B query merges
  per-shard top-Bs. The largest gathers left per category row: the 8 B query candidates and
  the 8 devices' counts of Trues."""
  pool, dim, batch = 4000, 8, 4  # P / 8 = 500 columns per device, not a multiple of 32
  features = np.random.default_rng(0).normal(size=(pool, dim)).astype(np.float32)
  seed_ids = np.stack([np.arange(SEEDS), 18 + np.arange(SEEDS)]).astype(np.int32)
  ids, answers = jnp.zeros((CATEGORIES, batch), jnp.int32), jnp.zeros((CATEGORIES, batch), bool)
  mesh = sharding.make_mesh([("data", 8)])
  programs = {}
  for querying in ("adaptive", "random"):
    config = loop.LoopConfig(batch_size=batch, querying=querying, pseudo_negative_factor=2.0)
    engine = runner.Engine(config, mesh=mesh)
    pool_features = engine.place_features(features)
    state = engine.init(pool_features, seed_ids, seed=0)
    programs[f"query ({querying})"] = engine.query.lower(state)
  rows = jnp.zeros((CATEGORIES, 64, dim), jnp.float32)
  programs["observe"] = engine.observe.lower(state, ids, answers, pool_features, rows, 64)
  programs["refit"] = engine.refit.lower(state, pool_features, 64)
  texts = {name: lowered.compile().as_text() for name, lowered in programs.items()}
  gathered = {name: _collective_shapes(text, "all-gather") for name, text in texts.items()}
  too_large = {
    name: shapes
    for name, shapes in gathered.items()
    if any(math.prod(shape) // CATEGORIES > 8 * batch for shape in shapes)
  }
  assert too_large == {}, gathered
  summed = _collective_shapes(texts["observe"], "all-reduce")
  # The bottom-half selection's 2 histograms (the draw among its candidates works on ranks).
  assert summed.count((CATEGORIES, 65536)) == 2, summed


def test_run_strategy_with_a_sharded_engine_resumes_to_the_one_device_state(
  problem, engines, sharded_engine, tmp_path
):
  run_ours_linear(problem, tmp_path / "one", engine=engines["adaptive"])
  run_ours_linear(problem, tmp_path / "split", engine=sharded_engine, stop_after=2)
  run_ours_linear(problem, tmp_path / "split", engine=sharded_engine)  # restores round 2
  assert (
    runner.differing_leaves(
      _final_state(problem, tmp_path / "one"), _final_state(problem, tmp_path / "split")
    )
    == []
  )
