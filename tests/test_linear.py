"""Tests of rare_jax.active.linear: agreement with scikit-learn, padding, warm start, vmap, jit."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from rare_jax.active import linear

L2 = 0.7
NUM_ROWS, NUM_PADDING, DIM = 80, 16, 5


def make_data(seed, num_rows=NUM_ROWS, dim=DIM):
  """Overlapping classes (a finite optimum), non-centred features, weights in [0.5, 2]."""
  rng = np.random.default_rng(seed)
  features = rng.normal(size=(num_rows, dim)) + rng.uniform(0, 3, size=dim)
  true_w = rng.normal(size=dim)
  logits = (features - features.mean(0)) @ true_w + rng.normal(size=num_rows)
  labels = (logits > 0.3).astype(np.float64)
  weights = rng.uniform(0.5, 2.0, size=num_rows)
  return features, labels, weights


def objective(features, labels, weights, coef, intercept, l2=L2):
  """sum_i w_i logloss_i + l2/2 ||coef||^2, and the weighted mean log-loss, in f64 numpy."""
  logits = features @ coef + intercept
  losses = np.logaddexp(0, logits) - labels * logits
  return float(weights @ losses + 0.5 * l2 * coef @ coef), float(weights @ losses / weights.sum())


@functools.cache
def sklearn_fit(seed, l2=L2):
  features, labels, weights = make_data(seed)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # lbfgs may report its ftol stop at tol=1e-12
    clf = LogisticRegression(C=1 / l2, solver="lbfgs", tol=1e-12, max_iter=100_000)
    clf.fit(features, labels, sample_weight=weights)
  return clf.coef_[0], float(clf.intercept_[0])


def pad(features, labels, weights, num_padding, seed=99):
  """Appends padding rows: finite junk features, junk labels, weight 0."""
  rng = np.random.default_rng(seed)
  return (
    np.concatenate([features, 100 * rng.normal(size=(num_padding, features.shape[1]))]),
    np.concatenate([labels, rng.integers(0, 2, num_padding).astype(labels.dtype)]),
    np.concatenate([weights, np.zeros(num_padding)]),
  )


ZEROS = linear.init_model(DIM)


@functools.cache
def fit64(solver):
  """Jitted f64 fit, shared by the tests (call under `jax.enable_x64`; rows padded to 96)."""
  return jax.jit(
    functools.partial(
      linear.fit_logistic_with_info, l2=L2, tol=1e-10, max_iters=1000, solver=solver
    )
  )


@pytest.fixture(scope="module")
def fit_f32():
  """One jitted f32 fit shared by the f32 tests (a single compilation per input shape)."""
  return jax.jit(
    functools.partial(linear.fit_logistic_with_info, l2=L2, tol=1e-6, max_iters=500),
  )


@pytest.mark.parametrize("solver", linear.SOLVERS)
def test_padded_fit_matches_sklearn_float64(solver):
  """sklearn sees the 80 real rows; rare_jax sees them plus 16 junk padding rows."""
  features, labels, weights = make_data(0)
  coef, intercept = sklearn_fit(0)
  with jax.enable_x64(True):
    model, info = fit64(solver)(*pad(features, labels, weights, NUM_PADDING), init=ZEROS)
    ours_w, ours_b = np.asarray(model.weights), float(model.bias)
    assert model.weights.dtype == jnp.float64
  assert bool(info.converged), info
  ours_obj, ours_loss = objective(features, labels, weights, ours_w, ours_b)
  theirs_obj, theirs_loss = objective(features, labels, weights, coef, intercept)
  assert abs(ours_loss - theirs_loss) <= 1e-4 * theirs_loss
  assert ours_obj <= theirs_obj * (1 + 1e-9)  # never worse than sklearn's optimum
  np.testing.assert_allclose(ours_w, coef, atol=1e-5 * np.abs(coef).max())
  np.testing.assert_allclose(ours_b, intercept, atol=1e-5 * max(1, abs(intercept)))
  # The reported objective is the objective over sum(weights).
  assert abs(float(info.objective) - ours_obj / weights.sum()) <= 1e-9


def test_matches_sklearn_float32(fit_f32):
  features, labels, weights = make_data(0)
  coef, intercept = sklearn_fit(0)
  model, info = fit_f32(
    jnp.asarray(features, jnp.float32), jnp.asarray(labels), jnp.asarray(weights), init=ZEROS
  )
  assert model.weights.dtype == jnp.float32 and bool(info.converged)
  _, ours_loss = objective(
    features, labels, weights, np.asarray(model.weights, np.float64), float(model.bias)
  )
  _, theirs_loss = objective(features, labels, weights, coef, intercept)
  assert abs(ours_loss - theirs_loss) <= 1e-4 * theirs_loss
  np.testing.assert_allclose(np.asarray(model.weights), coef, atol=2e-4 * np.abs(coef).max())
  np.testing.assert_allclose(float(model.bias), intercept, atol=2e-4 * max(1, abs(intercept)))


def test_example_weights_equal_repeated_rows():
  """Weight 2 is the row counted twice; weight 0 is the row absent (the objective's meaning)."""
  features, labels, _ = make_data(1)
  weights = np.ones(NUM_ROWS)
  weights[:10], weights[10:15] = 2.0, 0.0
  repeated = np.r_[np.arange(NUM_ROWS), np.arange(10)]
  repeated = repeated[(repeated < 10) | (repeated >= 15)]  # 85 rows
  with jax.enable_x64(True):
    weighted, _ = fit64("lbfgs")(*pad(features, labels, weights, NUM_PADDING), init=ZEROS)
    duplicated, _ = fit64("lbfgs")(
      *pad(features[repeated], labels[repeated], np.ones(repeated.size), NUM_PADDING - 5),
      init=ZEROS,
    )
    np.testing.assert_allclose(weighted.weights, duplicated.weights, atol=1e-7)
    np.testing.assert_allclose(weighted.bias, duplicated.bias, atol=1e-7)


@pytest.mark.parametrize("solver", linear.SOLVERS)
def test_padding_contents_change_nothing(solver):
  features, labels, weights = make_data(2)
  with jax.enable_x64(True):
    junk, _ = fit64(solver)(*pad(features, labels, weights, NUM_PADDING, seed=1), init=ZEROS)
    other_junk, _ = fit64(solver)(*pad(features, labels, weights, NUM_PADDING, seed=2), init=ZEROS)
    np.testing.assert_allclose(junk.weights, other_junk.weights, atol=1e-9)
    np.testing.assert_allclose(junk.bias, other_junk.bias, atol=1e-9)


def test_padding_changes_nothing_float32(fit_f32):
  features, labels, weights = make_data(2)
  plain, _ = fit_f32(
    *(jnp.asarray(a, jnp.float32) for a in (features, labels, weights)), init=ZEROS
  )
  padded_arrays = pad(features, labels, weights, NUM_PADDING)
  padded, _ = fit_f32(*(jnp.asarray(a, jnp.float32) for a in padded_arrays), init=ZEROS)
  np.testing.assert_allclose(padded.weights, plain.weights, atol=1e-4)
  np.testing.assert_allclose(padded.bias, plain.bias, atol=1e-4)


@pytest.mark.parametrize("solver", ["active_lbfgs", "lbfgs"])
def test_warm_start_same_optimum_fewer_iterations(solver):
  data = pad(*make_data(3), NUM_PADDING)
  other = pad(*make_data(4), NUM_PADDING)
  perturbed = (data[0], data[1], data[2] * np.linspace(0.8, 1.2, data[2].size))
  with jax.enable_x64(True):
    fit = fit64(solver)
    cold, cold_info = fit(*data, init=ZEROS)
    near, _ = fit(*perturbed, init=ZEROS)  # the optimum of a perturbed set (one round later)
    warm, warm_info = fit(*data, init=near)
    far_model, _ = fit(*other, init=ZEROS)  # another problem's optimum, shifted
    from_far, _ = fit(*data, init=far_model.replace(bias=far_model.bias + 5.0))
    for model in (warm, from_far):
      np.testing.assert_allclose(model.weights, cold.weights, atol=1e-7)
      np.testing.assert_allclose(model.bias, cold.bias, atol=1e-7)
  assert int(warm_info.num_iters) < int(cold_info.num_iters), (warm_info, cold_info)


@pytest.mark.parametrize("solver", ["active_lbfgs", "lbfgs"])
def test_given_initial_margins_start_the_same_fit(solver):
  """A warm start given its margins (e.g. the pool's scores) runs the fit a computed start
  runs: same optimum and iterations; margins of another model are a different start; shapes
  are checked."""
  data = pad(*make_data(3), NUM_PADDING)
  perturbed = (data[0], data[1], data[2] * np.linspace(0.8, 1.2, data[2].size))
  with jax.enable_x64(True):
    fit = fit64(solver)
    near, _ = fit(*perturbed, init=ZEROS)
    computed, computed_info = fit(*data, init=near)
    margins = data[0] @ np.asarray(near.weights) + float(near.bias)
    given, given_info = fit(*data, init=near, init_margins=jnp.asarray(margins))
    _, wrong_info = fit(*data, init=near, init_margins=jnp.asarray(margins + 3.0))
  np.testing.assert_allclose(given.weights, computed.weights, atol=1e-9)
  np.testing.assert_allclose(given.bias, computed.bias, atol=1e-9)
  assert int(given_info.num_iters) == int(computed_info.num_iters)
  assert int(wrong_info.num_iters) != int(computed_info.num_iters)
  with pytest.raises(ValueError, match="init_margins of shape"):
    linear.fit_logistic(*data, l2=L2, init_margins=jnp.zeros(3))


@pytest.mark.parametrize("active_rows", [8, 200])
def test_active_hessian_inverse_solves_the_low_rank_plus_diagonal_hessian(monkeypatch, active_rows):
  """active_lbfgs's initial matrix is M^-1 for M = the exact curvature of the `active_rows`
  most curved rows + (penalty + the other rows' curvature trace / D) on the weights, (1e-3
  penalty + their summed curvature) on the bias, each at least `_ACTIVE_FLOOR` of the mean
  curvature per coordinate; with all rows active, M is the Hessian (plus that ridge or floor on
  the bias). Checked against a dense numpy solve of that M."""
  monkeypatch.setattr(linear, "_ACTIVE_ROWS", active_rows)
  features, labels, weights = pad(*make_data(5), NUM_PADDING)
  rng = np.random.default_rng(6)
  scaled = weights / weights.sum()
  mean = scaled @ features
  l2 = L2 / weights.sum()
  margins = (features - mean) @ rng.normal(size=DIM) + 0.3
  vectors = rng.normal(size=(3, DIM + 1))
  with jax.enable_x64(True):
    problem = linear._Problem(
      jnp.asarray(features), jnp.asarray(labels), jnp.asarray(scaled), jnp.asarray(mean), l2
    )
    squared_norms = jnp.sum((jnp.asarray(features) - mean) ** 2, axis=1)
    apply = linear._active_hessian_inverse(problem, jnp.asarray(margins), squared_norms)
    ours = np.asarray(apply(jnp.asarray(vectors)))
  probs = 1 / (1 + np.exp(-margins))
  curvature = scaled * probs * (1 - probs)
  top = np.argsort(-curvature, kind="stable")[: min(active_rows, curvature.size)]
  rest = np.delete(curvature, top)
  rest_norms = np.delete(np.asarray(squared_norms), top)
  rows = np.c_[features[top] - mean, np.ones(top.size)] * np.sqrt(curvature[top])[:, None]
  diagonal = np.r_[np.full(DIM, l2 + rest @ rest_norms / DIM), 1e-3 * l2 + rest.sum()]
  floor = linear._ACTIVE_FLOOR * curvature @ (np.asarray(squared_norms) + 1) / (DIM + 1)
  assert (diagonal < floor).any() == (active_rows >= curvature.size)  # the floor binds there
  diagonal = np.maximum(diagonal, floor)
  expected = np.linalg.solve(np.diag(diagonal) + rows.T @ rows, vectors.T).T
  np.testing.assert_allclose(ours, expected, rtol=1e-9, atol=1e-12)
  if active_rows < curvature.size:  # the identity part is in use (and not negligible)
    assert rest.sum() > 0.1 * curvature.sum()


def test_inverse_hessian_times_matches_the_two_loop_recursion():
  """The compact form with a general initial matrix gamma * M^-1 (gamma = s.y / y.M^-1 y of the
  newest pair) equals the two-loop recursion with that matrix, for a full, a partly filled
  (junk in the unused slots) and an empty ring buffer."""
  rng = np.random.default_rng(7)
  dim, memory = 6, linear._LBFGS_MEMORY
  root = rng.normal(size=(dim, dim))
  m_inverse = np.linalg.inv(root @ root.T + dim * np.eye(dim))
  grad = rng.normal(size=dim)
  for count, newest in [(memory, 4), (3, 8), (1, 0), (0, memory - 1)]:
    s_hist, y_hist = rng.normal(size=(memory, dim)), rng.normal(size=(memory, dim))
    slots = [(newest - age) % memory for age in range(count)][::-1]  # oldest .. newest
    for slot in slots:  # positive curvature: y = A s for an SPD A
      y_hist[slot] = (root.T @ root + np.eye(dim)) @ s_hist[slot]
    with jax.enable_x64(True):
      ours = linear._inverse_hessian_times(
        jnp.asarray(grad),
        jnp.asarray(s_hist),
        jnp.asarray(y_hist),
        jnp.asarray(count),
        jnp.asarray(newest),
        lambda vectors: vectors @ jnp.asarray(m_inverse),
      )
    q, alphas = grad.copy(), []
    for slot in reversed(slots):
      alpha = s_hist[slot] @ q / (y_hist[slot] @ s_hist[slot])
      alphas.append(alpha)
      q -= alpha * y_hist[slot]
    gamma = 1.0
    if count:
      y_new = y_hist[newest]
      gamma = s_hist[newest] @ y_new / (y_new @ m_inverse @ y_new)
    r = gamma * m_inverse @ q
    for slot, alpha in zip(slots, reversed(alphas), strict=True):
      r += s_hist[slot] * (alpha - y_hist[slot] @ r / (y_hist[slot] @ s_hist[slot]))
    np.testing.assert_allclose(np.asarray(ours), r, rtol=1e-10, err_msg=f"count {count}")


def test_centred_squared_norms():
  features, labels, weights = pad(*make_data(5), NUM_PADDING)
  scaled = weights / weights.sum()
  mean = scaled @ features
  with jax.enable_x64(True):
    problem = linear._Problem(
      jnp.asarray(features), jnp.asarray(labels), jnp.asarray(scaled), jnp.asarray(mean), 0.1
    )
    norms = np.asarray(linear._centred_squared_norms(problem))
  np.testing.assert_allclose(norms, np.sum((features - mean) ** 2, axis=1), rtol=1e-12)


@pytest.mark.parametrize("solver", ["active_lbfgs", "lbfgs"])
@pytest.mark.parametrize("l2, weight_scale", [(1e-3, 50.0), (1e-4, 1.0)])
def test_float32_fits_with_a_tiny_penalty_converge(solver, l2, weight_scale):
  """A penalty tiny next to the curvature (sklearn's C = 1,000-10,000) with all rows exact in
  active_lbfgs's Hessian: its small system must stay usable in f32 (it gave NaN weights)."""
  features, labels, weights = make_data(8, num_rows=200, dim=64)
  weights = weights * weight_scale
  fit = functools.partial(
    linear.fit_logistic_with_info, l2=l2, tol=1e-6, max_iters=500, solver=solver
  )
  model, info = jax.jit(fit)(*(jnp.asarray(a, jnp.float32) for a in (features, labels, weights)))
  assert bool(info.converged) and np.all(np.isfinite(np.asarray(model.weights))), info
  with jax.enable_x64(True):
    _, best = jax.jit(functools.partial(fit, tol=1e-10, solver="lbfgs"))(
      jnp.asarray(features), jnp.asarray(labels), jnp.asarray(weights)
    )
  # Nearly separable: at tol 1e-6 either solver stops within a few % of the optimum's objective.
  assert float(info.objective) <= float(best.objective) * 1.05, (info, best)


def test_active_lbfgs_with_few_exact_rows_reaches_sklearns_optimum(monkeypatch):
  """With 8 exact rows of 96 (most of the curvature in the identity part) the fit still ends
  at scikit-learn's optimum, as with all rows exact."""
  features, labels, weights = make_data(0)
  coef, intercept = sklearn_fit(0)
  fit = fit64("active_lbfgs")
  with jax.enable_x64(True):
    _, all_rows_info = fit(*pad(features, labels, weights, NUM_PADDING), init=ZEROS)
    monkeypatch.setattr(linear, "_ACTIVE_ROWS", 8)
    # A row count no other test uses: traced (and compiled) anew, with 8 exact rows (that
    # compilation stays in fit64's cache; nothing else calls it with 103 rows).
    model, info = fit(*pad(features, labels, weights, NUM_PADDING + 7), init=ZEROS)
  assert bool(info.converged), info
  assert int(info.num_iters) != int(all_rows_info.num_iters)  # another initial matrix
  np.testing.assert_allclose(np.asarray(model.weights), coef, atol=1e-5 * np.abs(coef).max())
  np.testing.assert_allclose(float(model.bias), intercept, atol=1e-5 * max(1, abs(intercept)))


NUM_CATEGORIES = 3
BATCHED_TRACES = []


@functools.cache
def fit_batched():
  """The jitted f32 batched fit at [3, 96, 5], shared; counts its traces."""

  def fit(features, labels, weights, init):
    BATCHED_TRACES.append(1)
    return linear.fit_logistic_batched_with_info(
      features, labels, weights, init=init, l2=L2, tol=1e-6, max_iters=500
    )

  return jax.jit(fit)


def batched_data(seed):
  data = [pad(*make_data(seed + c), NUM_PADDING, seed=c) for c in range(NUM_CATEGORIES)]
  return tuple(jnp.asarray(np.stack([d[i] for d in data]), jnp.float32) for i in range(3))


def test_batched_equals_per_category_loop_and_jit_equals_eager():
  features, labels, weights = batched_data(10)
  batched, info = fit_batched()(
    features, labels, weights, linear.init_model(DIM, batch_shape=(NUM_CATEGORIES,))
  )
  assert batched.weights.shape == (NUM_CATEGORIES, DIM)
  assert batched.bias.shape == (NUM_CATEGORIES,)
  assert info.num_iters.shape == (NUM_CATEGORIES,) and bool(np.all(info.converged))
  kwargs = dict(l2=L2, tol=1e-6, max_iters=500)
  single_fit = jax.jit(functools.partial(linear.fit_logistic, **kwargs))
  for c in range(NUM_CATEGORIES):
    single = single_fit(features[c], labels[c], weights[c])
    # Categories converge at different iterations; each stops on its own.
    np.testing.assert_allclose(single.weights, batched.weights[c], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(single.bias, batched.bias[c], rtol=1e-5, atol=1e-6)
  eager = linear.fit_logistic(features[0], labels[0], weights[0], **kwargs)  # not jitted
  np.testing.assert_allclose(eager.weights, batched.weights[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(eager.bias, batched.bias[0], rtol=1e-5, atol=1e-6)


def test_one_compilation_across_rounds():
  """Same bucket shapes, new data and a warm start each round: traced once."""
  fit = fit_batched()
  model = linear.init_model(DIM, batch_shape=(NUM_CATEGORIES,))
  model, _ = fit(*batched_data(20), model)  # warm-up (may be the first trace)
  traces = len(BATCHED_TRACES)
  for round_index in range(1, 4):
    model, info = fit(*batched_data(20 + round_index), model)
    assert bool(np.all(info.converged))
  assert len(BATCHED_TRACES) == traces


def test_a_cpu_fit_runs_scipys_lapack_on_one_thread(monkeypatch):
  """XLA:CPU's Cholesky and triangular solves call scipy's OpenBLAS: its threads would compete
  with XLA's and make the rounding depend on their number, so a fit sets them to 1 (scipy's
  library only: numpy's keeps its threads)."""
  import scipy.linalg.cython_lapack  # noqa: F401
  import threadpoolctl

  controller = threadpoolctl.ThreadpoolController()
  blas = controller.select(user_api="blas").lib_controllers
  scipys = [lib for lib in blas if "scipy.libs" in lib.filepath or "/scipy/" in lib.filepath]
  if not scipys:
    pytest.skip(
      f"scipy's BLAS is not a library of its own here (threadpoolctl "
      f"{threadpoolctl.__version__} found {[lib.filepath for lib in blas]})"
    )
  others = {lib.filepath: lib.num_threads for lib in blas if lib not in scipys}
  with controller.select(filepath=[lib.filepath for lib in scipys]).limit(limits=2):
    if [lib.num_threads for lib in scipys] != [2] * len(scipys):
      pytest.skip(f"scipy's BLAS would not take 2 threads: {[lib.num_threads for lib in scipys]}")
    monkeypatch.setattr(linear, "_LAPACK_THREADS_SET", False)
    features, labels, weights = make_data(3)
    jax.jit(functools.partial(linear.fit_logistic, l2=L2)).lower(features, labels, weights)
    threads = [lib.num_threads for lib in scipys]
  assert threads == [1] * len(scipys)
  assert {lib.filepath: lib.num_threads for lib in blas if lib not in scipys} == others


def test_a_failure_to_set_lapack_threads_never_fails_a_fit(monkeypatch):
  def broken(count):
    raise RuntimeError("no BLAS here")

  monkeypatch.setattr(linear, "_set_lapack_threads", broken)
  monkeypatch.setattr(linear, "_LAPACK_THREADS_SET", False)
  features, labels, weights = make_data(3)
  jax.jit(functools.partial(linear.fit_logistic, l2=L2)).lower(features, labels, weights)
  assert linear._LAPACK_THREADS_SET  # tried once, not again at every trace


def test_degenerate_training_sets_stay_finite():
  """One class only (the bias grows until the gradient is small), an all-padding category."""
  features, labels, weights = (np.array(a) for a in batched_data(30))
  labels[0] = 1.0  # category 0: positives only
  weights[1] = 0.0  # category 1: all padding
  init = linear.LinearModel(jnp.ones((NUM_CATEGORIES, DIM)), jnp.array([0.0, 3.0, 0.0]))
  model, info = fit_batched()(features, labels, weights, init)
  assert np.all(np.isfinite(np.asarray(model.weights))) and np.all(np.isfinite(model.bias))
  probs = linear.predict_proba(jnp.asarray(features[0]), model)
  assert float(jnp.min(probs[:, 0])) > 0.9  # positives-only category: everything positive
  # All padding: the penalty alone pulls w to 0; the (unpenalised) bias is left as it was.
  np.testing.assert_allclose(model.weights[1], 0, atol=1e-6)
  np.testing.assert_allclose(model.bias[1], 3.0)
  assert bool(np.all(info.converged))


def test_bfloat16_features_fit_the_same_problem(fit_f32):
  """bf16 storage is exact for these values, so the fit must equal the f32 fit on them."""
  features, labels, weights = make_data(5)
  as_bf16 = jnp.asarray(features, jnp.bfloat16)
  from_bf16, info = fit_f32(as_bf16, jnp.asarray(labels), jnp.asarray(weights), init=ZEROS)
  from_f32, _ = fit_f32(
    as_bf16.astype(jnp.float32), jnp.asarray(labels), jnp.asarray(weights), init=ZEROS
  )
  assert from_bf16.weights.dtype == jnp.float32 and bool(info.converged)
  np.testing.assert_allclose(from_bf16.weights, from_f32.weights, atol=1e-4)
  np.testing.assert_allclose(from_bf16.bias, from_f32.bias, atol=1e-4)


def test_decision_function_matches_numpy():
  rng = np.random.default_rng(6)
  features = rng.normal(size=(40, DIM))
  weights, bias = rng.normal(size=(3, DIM)), rng.normal(size=3)
  model = linear.LinearModel(jnp.asarray(weights, jnp.float32), jnp.asarray(bias, jnp.float32))
  expected = features @ weights.T + bias
  logits = jax.jit(linear.decision_function)(jnp.asarray(features, jnp.float32), model)
  assert logits.shape == (40, 3) and logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
    linear.predict_proba(jnp.asarray(features, jnp.float32), model),
    1 / (1 + np.exp(-expected)),
    rtol=1e-5,
    atol=1e-6,
  )
  single = linear.decision_function(
    jnp.asarray(features, jnp.float32), model.replace(weights=model.weights[0], bias=model.bias[0])
  )
  np.testing.assert_allclose(single, expected[:, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [256, 512, 1000, 1024])
def test_products_over_the_rows_match_float64(rows):
  """`X^T c` and `V X` (the gradient's and the centring mean's products): on CPU, over a
  multiple of 256 rows (>= 512) they run as one batch of 256-row blocks whose partial sums are
  added (faster on XLA:CPU); any other count, as one product. Both to f32 rounding, and the
  vector forms keep their shapes."""
  rng = np.random.default_rng(11)
  features = rng.normal(size=(rows, 48)).astype(np.float32)
  columns = rng.normal(size=(rows, 3)).astype(np.float32)
  expected = features.astype(np.float64).T @ columns.astype(np.float64)
  product = jax.jit(linear.features_times, static_argnums=2)
  np.testing.assert_allclose(product(features, columns, True), expected, rtol=1e-5, atol=1e-4)
  vectors_times = jax.jit(linear._vectors_times_features)
  np.testing.assert_allclose(vectors_times(columns.T, features), expected.T, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(
    linear._rmatvec(jnp.asarray(features), jnp.asarray(columns[:, 0])),
    expected[:, 0],
    rtol=1e-5,
    atol=1e-4,
  )
  blocked = jax.default_backend() == "cpu" and rows % 256 == 0 and rows >= 512
  for function, args in (
    (product, (features, columns, True)),
    (vectors_times, (columns.T, features)),
  ):
    text = function.lower(*args).as_text()
    assert ("batching_dims" in text or "batch_dims" in text) == blocked, text


def test_decision_function_bfloat16_keeps_float32_accuracy():
  """bf16 features times f32 weights: as accurate as f32 maths on the bf16 values (rounding
  the weights to bf16 instead would be off by about 1e-2 here)."""
  rng = np.random.default_rng(7)
  features = jnp.asarray(rng.normal(size=(64, 256)), jnp.bfloat16)
  weights = rng.normal(size=(4, 256)).astype(np.float32)
  model = linear.LinearModel(jnp.asarray(weights), jnp.zeros(4))
  expected = np.asarray(features, np.float64) @ weights.T.astype(np.float64)
  logits = np.asarray(linear.decision_function(features, model))
  assert logits.dtype == np.float32
  np.testing.assert_allclose(logits, expected, atol=1e-4)
  rounded = (
    np.asarray(features, np.float64) @ np.asarray(jnp.asarray(weights, jnp.bfloat16), np.float64).T
  )
  assert np.abs(rounded - expected).max() > 1e-3  # the test can tell the two apart


def test_bucket_size():
  assert linear.bucket_size(0) == 64
  assert linear.bucket_size(64) == 64
  assert linear.bucket_size(65) == 96
  assert linear.bucket_size(97) == 128
  assert linear.bucket_size(10_000) == 12_288
  assert linear.bucket_size(10_000, steps_per_octave=4) == 10_240
  assert linear.bucket_size(5, minimum=1, steps_per_octave=1) == 8
  sizes = {linear.bucket_size(n) for n in range(1, 20_000)}
  assert len(sizes) == 18  # 64 .. 24576: two per doubling
  for n in (1, 100, 1000, 5000, 12_289):
    assert n <= linear.bucket_size(n) <= max(64, 1.5 * n)
  for bad in (dict(n=-1), dict(n=3, minimum=0), dict(n=3, steps_per_octave=3)):
    with pytest.raises(ValueError):
      linear.bucket_size(**bad)


def test_check_finite():
  good = np.ones((10, 3), np.float32)
  linear.check_finite(good)
  linear.check_finite(jnp.asarray(good))
  bad = good.copy()
  bad[7, 1] = np.nan
  bad[2, 0] = np.inf
  with pytest.raises(ValueError, match="2 NaN/inf"):
    linear.check_finite(bad, chunk_rows=3)
  with pytest.raises(ValueError, match="store"):
    linear.check_finite(jnp.asarray(bad), name="store")


@pytest.mark.parametrize(
  "change, match",
  [
    (dict(l2=0.0), "l2=0.0"),
    (dict(l2=float("nan")), "l2=nan"),
    (dict(solver="sgd"), "solver='sgd'"),
    (dict(labels=np.ones(NUM_ROWS + 1)), "labels of shape"),
    (dict(example_weights=np.ones((NUM_ROWS, 1))), "example_weights of shape"),
    (dict(features=np.ones(NUM_ROWS)), "features of shape"),
    (dict(labels=np.full(NUM_ROWS, 2.0)), "labels outside"),
    (dict(example_weights=-np.ones(NUM_ROWS)), "example_weights negative"),
    (dict(init=linear.init_model(DIM + 1)), "init with weights"),
    (dict(max_iters=-1), "max_iters=-1"),
  ],
)
def test_bad_input_raises(change, match):
  features, labels, weights = make_data(9)
  arguments = dict(features=features, labels=labels, example_weights=weights, l2=L2)
  arguments.update(change)
  with pytest.raises(ValueError, match=match):
    linear.fit_logistic(**arguments)


def test_bfloat16_split_is_exact():
  """The three bf16 parts behind bf16 products sum exactly to the f32 vector (under jit)."""
  rng = np.random.default_rng(11)
  values = (rng.normal(size=(64, 2)) * 10.0 ** rng.integers(-6, 6, size=(64, 2))).astype(np.float32)
  parts = np.asarray(jax.jit(linear._split_bfloat16)(jnp.asarray(values)), np.float64)
  assert parts.shape == (64, 6)
  np.testing.assert_array_equal(parts[:, :2] + parts[:, 2:4] + parts[:, 4:], values)


def test_decision_function_bad_shapes():
  features = jnp.ones((4, DIM))
  with pytest.raises(ValueError, match="model.weights"):
    linear.decision_function(features, linear.init_model(DIM + 1, batch_shape=(2,)))
  with pytest.raises(ValueError, match="model.bias"):
    linear.decision_function(features, linear.LinearModel(jnp.ones((2, DIM)), jnp.ones(3)))


def test_host_sigmoid_is_stable_and_export_and_predict_use_it():
  """`linear.sigmoid` matches scipy's expit from -740 to 740 without an overflow warning and
  keeps the tiny probabilities of very negative logits (1 / (1 + exp(-x)) rounds them to 0 with
  a warning); the export's pool probabilities and predict's scores are computed by it."""
  from scipy.special import expit

  from rare_jax import predict
  from rare_jax.webapp import exports

  logits = np.array([[-740.0, -720.0, -30.0, -1e-9, 0.0, 1e-9, 2.5, 30.0, 740.0]])
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    host = linear.sigmoid(logits)
    pool = exports.PoolScores(*[None] * 5, logits, *[None] * 4).probabilities
  assert host.dtype == np.float64 and host.shape == logits.shape
  normal = np.abs(logits) < 700  # scipy's expit rounds exp(-720) to 0 as well
  np.testing.assert_allclose(host[normal], expit(logits[normal]), rtol=1e-15, atol=0)
  # exp(-720) ~ 1.9e-313 and exp(-740) ~ 4.2e-322: subnormal float64, ~10 and ~3 digits.
  np.testing.assert_allclose(host[~normal], np.exp(-np.logaddexp(0, -logits[~normal])), rtol=0.01)
  assert (host[0, :2] > 0).all()
  np.testing.assert_array_equal(pool, host)
  np.testing.assert_array_equal(predict.probabilities(logits), host.astype(np.float32))
