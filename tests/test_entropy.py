"""Entropy measures: every expected number comes from numpy, a closed form or a hand value."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from noisy_flax import entropy, noise

KS = (1, 2, 3, 4, 5, 9, 10, 16, 33)


# ---------------------------------------------------------------------------
# log|det(I + Q)|
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("k", KS)
def test_optimal_q_closed_form_matches_slogdet(k):
    _, expected = np.linalg.slogdet(np.eye(k) + noise.optimal_q(k))
    assert entropy.optimal_q_log_abs_det(k) == pytest.approx(expected, abs=1e-9)
    assert entropy.log_abs_det(noise.optimal_q(k)) == pytest.approx(expected, abs=1e-9)


# alpha = 0.5 with even k is singular: see test_circulant_singular_case.
INVERTIBLE_CIRCULANT = [(k, a) for k in KS for a in (0.0, 0.1, 0.3, 0.4, 0.5, 0.9)
                        if not (a == 0.5 and k % 2 == 0)]


@pytest.mark.parametrize("k, alpha", INVERTIBLE_CIRCULANT)
def test_circulant_closed_form_matches_slogdet(k, alpha):
    _, expected = np.linalg.slogdet(np.eye(k) + noise.circulant_q(k, alpha))
    assert entropy.circulant_log_abs_det(k, alpha) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("k", (2, 4, 10))
def test_circulant_singular_case(k):
    by_hand = 0.5 * np.eye(k) + 0.5 * np.roll(np.eye(k), 1, axis=1)  # (1-a) I + a P, a = 1/2
    assert np.linalg.slogdet(by_hand)[0] == 0
    assert entropy.circulant_log_abs_det(k, 0.5) == -math.inf
    assert entropy.log_abs_det(by_hand, includes_identity=True) == -math.inf


def test_circulant_closed_form_survives_large_k():
    # 0.7^2200 ~ exp(-785) underflows to 0 in float64; the factored form must not.
    k, alpha = 2200, 0.3
    assert 0.7 ** k == 0.0
    _, expected = np.linalg.slogdet(np.eye(k) + noise.circulant_q(k, alpha))
    assert entropy.circulant_log_abs_det(k, alpha) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("rows", (3, 4))
@pytest.mark.parametrize("q", ("optimal", "circulant"))
def test_within_image_transform_log_det(rows, q):
    # Read the matrix the noise actually applies: x[0, j, c, 0] = delta_jc
    # comes out as (I + Q)[r, c].
    probe = jnp.eye(rows, dtype=jnp.float32)[None, :, :, None]
    applied = np.asarray(noise.within_image_noise(probe, q=q, alpha=0.3), np.float64)[0, :, :, 0]
    _, expected = np.linalg.slogdet(applied)
    assert entropy.within_image_log_abs_det(rows, q=q, alpha=0.3) == pytest.approx(expected, abs=1e-5)


def test_log_abs_det_of_a_general_matrix():
    q = np.random.default_rng(0).normal(size=(6, 6))
    expected = math.log(abs(np.linalg.det(np.eye(6) + q)))
    assert entropy.log_abs_det(q) == pytest.approx(expected, rel=1e-9)
    assert entropy.log_abs_det(np.eye(6) + q, includes_identity=True) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("q", [noise.optimal_q(4), noise.circulant_q(5, 0.4)], ids=["optimal", "circulant"])
def test_entropy_change_is_logdet_of_the_map_on_all_features(q):
    # x' = (I+Q) x on a k x d matrix is I_d (x) (I+Q) on the column-stacked vector.
    d = 3
    _, expected = np.linalg.slogdet(np.kron(np.eye(d), np.eye(len(q)) + q))
    assert entropy.linear_transform_entropy_change(q, d) == pytest.approx(expected, abs=1e-9)


# ---------------------------------------------------------------------------
# Gaussian closed form
# ---------------------------------------------------------------------------
def _random_joint_cov(rng, dim, rank=None):
    a = rng.normal(size=(dim, rank or dim + 2))
    return a @ a.T + 1e-3 * np.eye(dim)


def _gaussian_entropy(cov):
    _, logdet = np.linalg.slogdet(2 * math.pi * math.e * np.atleast_2d(cov))
    return 0.5 * logdet


@pytest.mark.parametrize("seed", range(5))
def test_conditional_entropy_matches_joint_minus_marginal(seed):
    dx, dy = 4, 3
    joint = _random_joint_cov(np.random.default_rng(seed), dx + dy)  # order (X, Y)
    cov_xx, cov_yx, cov_yy = joint[:dx, :dx], joint[dx:, :dx], joint[dx:, dx:]
    expected = _gaussian_entropy(joint) - _gaussian_entropy(cov_xx)
    assert entropy.gaussian_conditional_entropy(cov_yy, cov_yx, cov_xx) == pytest.approx(expected, abs=1e-9)


def test_scalar_conditional_entropy_hand_value():
    rho, noise_var = 0.8, 0.5
    # Unit variances with correlation rho: Var(Y|X) = 1 - rho^2; with noise on
    # X, Var(Y|X+E) = 1 - rho^2 / (1 + noise_var).
    before = 0.5 * math.log(2 * math.pi * math.e * (1 - rho ** 2))
    after = 0.5 * math.log(2 * math.pi * math.e * (1 - rho ** 2 / (1 + noise_var)))
    assert entropy.gaussian_conditional_entropy(1.0, rho, 1.0) == pytest.approx(before)
    assert entropy.gaussian_noise_entropy_change(1.0, rho, 1.0, noise_var) == pytest.approx(after - before)


@pytest.mark.parametrize("noise_cov", [0.7, [0.1, 0.5, 2.0]], ids=["scalar", "diagonal"])
def test_scalar_and_vector_noise_mean_isotropic_and_diagonal_noise(noise_cov):
    joint = _random_joint_cov(np.random.default_rng(3), 5)
    syy, syx, sxx = joint[3:, 3:], joint[3:, :3], joint[:3, :3]
    noisy = sxx + np.diag(np.broadcast_to(noise_cov, 3))  # sigma^2 I, or diag(v)
    conditional = lambda xx: _gaussian_entropy(syy - syx @ np.linalg.inv(xx) @ syx.T)
    expected = conditional(noisy) - conditional(sxx)
    assert entropy.gaussian_noise_entropy_change(syy, syx, sxx, noise_cov) == pytest.approx(expected, abs=1e-9)


def test_gaussian_noise_never_lowers_conditional_entropy():
    rng = np.random.default_rng(1234)
    for _ in range(200):
        dx, dy = rng.integers(1, 6, size=2)
        joint = _random_joint_cov(rng, dx + dy)
        blocks = joint[dx:, dx:], joint[dx:, :dx], joint[:dx, :dx]
        noise_cov = _random_joint_cov(rng, dx, rank=int(rng.integers(1, dx + 1))) * rng.uniform(0.01, 10)
        assert entropy.gaussian_noise_entropy_change(*blocks, noise_cov) >= -1e-10


def test_zero_noise_changes_nothing():
    joint = _random_joint_cov(np.random.default_rng(7), 5)
    blocks = joint[3:, 3:], joint[3:, :3], joint[:3, :3]
    assert entropy.gaussian_noise_entropy_change(*blocks, 0.0) == 0.0
    assert entropy.gaussian_noise_entropy_change(*blocks, np.zeros((3, 3))) == 0.0


def test_conditional_entropy_rejects_singular_cov_xx():
    with pytest.raises(ValueError, match="positive definite"):
        entropy.gaussian_conditional_entropy(np.eye(1), np.ones((1, 2)), np.ones((2, 2)))


# ---------------------------------------------------------------------------
# Empirical H(Y|Z)
# ---------------------------------------------------------------------------
def test_label_entropy_hand_values():
    assert entropy.label_entropy(np.repeat(np.arange(10), 7), 10) == pytest.approx(math.log(10))
    assert entropy.label_entropy(np.array([0, 0, 2, 2]), 3) == pytest.approx(math.log(2))
    assert entropy.label_entropy(np.zeros(5, int), 4) == 0.0


# All probe fits share one train shape (N x DIM, CLASSES) so the L-BFGS loop
# compiles once for the whole file.
N, DIM, CLASSES = 4000, 6, 4


def _class_constant_split(seed=0, num_classes=CLASSES, dim=DIM, n=N):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, dim))
    y_train, y_test = rng.integers(0, num_classes, n), rng.integers(0, num_classes, n)
    return centres[y_train], y_train, centres[y_test], y_test, num_classes


def _uninformative_split(n=N):
    rng = np.random.default_rng(1)
    probs = np.array([0.4, 0.3, 0.2, 0.1])
    y_train, y_test = rng.choice(CLASSES, n, p=probs), rng.choice(CLASSES, n, p=probs)
    z_train, z_test = rng.normal(size=(n, DIM)), rng.normal(size=(n, DIM))
    return (z_train, y_train, z_test, y_test, CLASSES), -float(np.sum(probs * np.log(probs)))


ESTIMATORS = [
    entropy.probe_conditional_entropy,
    entropy.gaussian_class_conditional_entropy,
    lambda *a: entropy.gaussian_class_conditional_entropy(*a, covariance="per_class"),
]
IDS = ["probe", "gaussian_shared", "gaussian_per_class"]


@pytest.mark.parametrize("estimate", ESTIMATORS, ids=IDS)
def test_class_constant_features_give_near_zero(estimate):
    result = estimate(*_class_constant_split())
    assert 0.0 <= result.value < 0.05
    assert result.accuracy == 1.0
    assert (result.n_train, result.n_test, result.num_classes, result.feature_dim) == (N, N, CLASSES, DIM)


@pytest.mark.parametrize("estimate", ESTIMATORS, ids=IDS)
def test_uninformative_features_give_label_entropy(estimate):
    # Per-example -log p(y) has sd ~0.6 nats here, so the sampling error of
    # the mean is ~0.6 / sqrt(N) ~ 0.01 at N = 4000; fitting 4 x 7 (probe) or
    # 4 x 6 + 21 (Gaussian) parameters adds ~params / (2 N) < 0.01 on top.
    split, h_y = _uninformative_split()
    tolerance = 5 * 0.6 / math.sqrt(N) + 0.01
    assert estimate(*split).value == pytest.approx(h_y, abs=tolerance)


@pytest.mark.parametrize("estimate", ESTIMATORS, ids=IDS)
def test_estimates_are_deterministic(estimate):
    z_train, y_train, z_test, y_test, classes = _class_constant_split(seed=3)
    rng = np.random.default_rng(5)  # overlap the classes so the fit is not trivial
    noisy = (z_train + rng.normal(size=z_train.shape), y_train,
             z_test + rng.normal(size=z_test.shape), y_test, classes)
    assert estimate(*noisy).as_dict() == estimate(*noisy).as_dict()


def test_estimate_reports_label_entropy_and_settings():
    split = _class_constant_split()
    result = entropy.probe_conditional_entropy(*split, l2=1e-3)
    assert result.label_entropy == pytest.approx(entropy.label_entropy(split[3], CLASSES))
    assert result.method == "linear_probe" and result.settings["l2"] == 1e-3


def _overlapping_split(seed=7, n=N):
    """Classes that overlap, each with its own covariance, unequal priors and
    features on different scales: every term of the estimates matters here
    (at the two extremes above, the class covariances are alike)."""
    rng = np.random.default_rng(seed)
    probs = np.array([0.4, 0.3, 0.2, 0.1])
    centres = 0.8 * rng.normal(size=(CLASSES, DIM))
    base = np.eye(DIM) + 0.3 * rng.normal(size=(DIM, DIM))
    mixing = base + 0.2 * rng.normal(size=(CLASSES, DIM, DIM))
    scales = np.array([1.0, 10.0, 0.1, 3.0, 1.0, 0.5])

    def draw():
        y = rng.choice(CLASSES, n, p=probs)
        z = centres[y] + np.einsum("nij,nj->ni", mixing[y], rng.normal(size=(n, DIM)))
        return z * scales, y

    (z_train, y_train), (z_test, y_test) = draw(), draw()
    return z_train, y_train, z_test, y_test, CLASSES


def _per_example_nll(log_post, y):
    return -log_post[np.arange(len(y)), y]


def _gaussian_reference(z_train, y_train, z_test, y_test, covariance, shrinkage, ridge=1e-6):
    """LDA / QDA written out with np.cov and scipy.stats.multivariate_normal."""
    import scipy.special
    import scipy.stats
    mean, sd = z_train.mean(axis=0), z_train.std(axis=0)
    a, b = (z_train - mean) / sd, (z_test - mean) / sd
    covs = [np.cov(a[y_train == c], rowvar=False, bias=True) for c in range(CLASSES)]
    if covariance == "shared":  # within-class scatter pooled over all rows
        counts = np.bincount(y_train, minlength=CLASSES)
        covs = [sum(counts[c] * covs[c] for c in range(CLASSES)) / len(y_train)] * CLASSES
    log_joint = np.stack([
        np.log(np.mean(y_train == c)) + scipy.stats.multivariate_normal(
            a[y_train == c].mean(axis=0),
            (1 - shrinkage) * cov + shrinkage * np.diag(np.diag(cov)) + ridge * np.eye(DIM)
        ).logpdf(b)
        for c, cov in enumerate(covs)], axis=1)
    return log_joint - scipy.special.logsumexp(log_joint, axis=1, keepdims=True)


@pytest.mark.parametrize("shrinkage", (0.0, 0.3))
@pytest.mark.parametrize("covariance", ("shared", "per_class"))
def test_gaussian_estimate_matches_scipy_lda_qda(covariance, shrinkage):
    import scipy.stats
    split = _overlapping_split()
    result = entropy.gaussian_class_conditional_entropy(*split, covariance=covariance,
                                                        shrinkage=shrinkage)
    log_post = _gaussian_reference(*split[:4], covariance, shrinkage)
    nll = _per_example_nll(log_post, split[3])
    assert 0.2 < nll.mean() < result.label_entropy - 0.1  # the classes really overlap
    assert result.value == pytest.approx(nll.mean(), rel=1e-9)
    assert result.stderr == pytest.approx(scipy.stats.sem(nll), rel=1e-9)
    assert result.accuracy == np.mean(np.argmax(log_post, axis=1) == split[3])


def _probe_reference(z_train, y_train, z_test, y_test, l2):
    """The probe's objective minimised in float64 by scipy's L-BFGS-B."""
    import scipy.optimize
    import scipy.special
    mean, sd = z_train.mean(axis=0), z_train.std(axis=0)
    a, b = (z_train - mean) / sd, (z_test - mean) / sd
    onehot = np.eye(CLASSES)[y_train]

    def objective(theta):
        w, bias = theta[:DIM * CLASSES].reshape(DIM, CLASSES), theta[DIM * CLASSES:]
        logits = a @ w + bias
        log_p = logits - scipy.special.logsumexp(logits, axis=1, keepdims=True)
        residual = (np.exp(log_p) - onehot) / len(a)
        value = -np.sum(onehot * log_p) / len(a) + 0.5 * l2 * np.sum(w ** 2)
        return value, np.concatenate([(a.T @ residual + l2 * w).ravel(), residual.sum(0)])

    theta = scipy.optimize.minimize(objective, np.zeros(DIM * CLASSES + CLASSES), jac=True,
                                    method="L-BFGS-B", options=dict(gtol=1e-10, ftol=0,
                                                                    maxiter=5000)).x
    logits = b @ theta[:DIM * CLASSES].reshape(DIM, CLASSES) + theta[DIM * CLASSES:]
    return logits - scipy.special.logsumexp(logits, axis=1, keepdims=True)


@pytest.mark.parametrize("l2", (1e-4, 0.3))
def test_probe_matches_a_float64_scipy_fit(l2):
    import scipy.stats
    split = _overlapping_split()
    result = entropy.probe_conditional_entropy(*split, l2=l2)
    nll = _per_example_nll(_probe_reference(*split[:4], l2), split[3])
    # The probe fits in float32 and stops at a gradient norm of 1e-6.
    assert result.value == pytest.approx(nll.mean(), abs=2e-4)
    assert result.stderr == pytest.approx(scipy.stats.sem(nll), rel=1e-2)
    assert result.settings["l2"] == l2


def test_probe_stops_at_the_gradient_tolerance():
    split = _overlapping_split()
    # L-BFGS on this small convex problem reaches |grad| <= 1e-6 well before
    # the 500-step cap; a tolerance above any gradient stops after one step.
    assert entropy.probe_conditional_entropy(*split, l2=0.3).settings["steps_run"] < 500
    assert entropy.probe_conditional_entropy(*split, tol=1e30).settings["steps_run"] == 1


def test_probe_stops_at_the_step_cap():
    # A tolerance of 0 is never met: the cap alone ends the fit, after exactly `steps`.
    settings = entropy.probe_conditional_entropy(*_overlapping_split(), steps=3, tol=0.0).settings
    assert (settings["steps_run"], settings["max_steps"]) == (3, 3)


def test_a_test_set_of_two_has_a_standard_error_and_its_own_size():
    """Two held-out examples already give a sample sd; the fit half keeps its N."""
    import scipy.stats
    z_train, y_train, z_test, y_test, _ = _overlapping_split()
    split = (z_train, y_train, z_test[:2], y_test[:2], CLASSES)
    nll = _per_example_nll(_gaussian_reference(*split[:4], "shared", 0.3), split[3])
    gaussian = entropy.gaussian_class_conditional_entropy(*split, shrinkage=0.3)
    assert gaussian.stderr == pytest.approx(scipy.stats.sem(nll), rel=1e-9)
    probe = entropy.probe_conditional_entropy(*split, l2=0.3)
    assert (probe.n_train, probe.n_test) == (gaussian.n_train, gaussian.n_test) == (N, 2)


def test_test_features_are_standardised_with_training_statistics():
    """A test set of classes 0 and 1 only has other means and spreads than
    the training set; both references standardise it with the train ones."""
    z_train, y_train, z_test, y_test, _ = _overlapping_split()
    keep = y_test < 2
    split = (z_train, y_train, z_test[keep], y_test[keep], CLASSES)
    probe = entropy.probe_conditional_entropy(*split, l2=0.3)
    nll = _per_example_nll(_probe_reference(*split[:4], 0.3), split[3])
    assert probe.value == pytest.approx(nll.mean(), abs=2e-4)
    gaussian = entropy.gaussian_class_conditional_entropy(*split, shrinkage=0.3)
    nll = _per_example_nll(_gaussian_reference(*split[:4], "shared", 0.3), split[3])
    assert gaussian.value == pytest.approx(nll.mean(), rel=1e-9)


@pytest.mark.parametrize("value", (2.0, 3.7))  # a mean exact in float64, and one that is not
@pytest.mark.parametrize("covariance", ("shared", "per_class"))
def test_a_constant_feature_changes_no_estimate(covariance, value):
    """A feature with one value everywhere says nothing about the label: the
    estimate equals the reference on the other features."""
    split = _overlapping_split()
    with_constant = [np.column_stack([z, np.full(len(z), value)]) if i in (0, 2) else z
                     for i, z in enumerate(split)]
    result = entropy.gaussian_class_conditional_entropy(*with_constant, covariance=covariance,
                                                        shrinkage=0.3)
    nll = _per_example_nll(_gaussian_reference(*split[:4], covariance, 0.3), split[3])
    assert result.value == pytest.approx(nll.mean(), rel=1e-9)


@pytest.mark.parametrize("covariance", ("shared", "per_class"))
def test_full_shrinkage_keeps_only_the_variances(covariance):
    # shrinkage = 1 is the end of the documented [0, 1] range: diagonal covariances.
    split = _overlapping_split()
    result = entropy.gaussian_class_conditional_entropy(*split, covariance=covariance,
                                                        shrinkage=1.0)
    nll = _per_example_nll(_gaussian_reference(*split[:4], covariance, 1.0), split[3])
    assert result.value == pytest.approx(nll.mean(), rel=1e-9)


def test_a_feature_on_a_tiny_scale_is_standardised_like_any_other():
    # Standard deviation ~1e-4 is small, not constant: scaling it changes nothing.
    z_train, y_train, z_test, y_test, _ = _overlapping_split()
    scale = np.array([1e-4, 1, 1, 1, 1, 1])
    split = (z_train * scale, y_train, z_test * scale, y_test, CLASSES)
    result = entropy.gaussian_class_conditional_entropy(*split, shrinkage=0.3)
    nll = _per_example_nll(_gaussian_reference(z_train, y_train, z_test, y_test, "shared", 0.3),
                           y_test)
    assert result.value == pytest.approx(nll.mean(), rel=1e-6)


def test_gaussian_estimate_rejects_test_class_unseen_in_training():
    z = np.random.default_rng(0).normal(size=(6, 2))
    with pytest.raises(ValueError, match="never occur in the training split"):
        entropy.gaussian_class_conditional_entropy(z, np.array([0, 0, 0, 1, 1, 1]), z,
                                                   np.array([0, 1, 2, 0, 1, 2]), 3)


@pytest.mark.parametrize("estimate", ESTIMATORS, ids=IDS)
def test_features_and_labels_of_different_lengths_are_rejected(estimate):
    z, y = np.zeros((5, 2)), np.array([0, 1, 0, 1])
    with pytest.raises(ValueError, match=r"n = len\(labels\)"):
        estimate(z, y, z[:4], y, 2)
    with pytest.raises(ValueError, match=r"n = len\(labels\)"):
        estimate(z[:4], y, z, y, 2)


def test_labels_out_of_range_are_rejected():
    z = np.zeros((3, 2))
    with pytest.raises(ValueError, match="labels must lie"):
        entropy.probe_conditional_entropy(z, np.array([0, 1, 3]), z, np.array([0, 1, 2]), 3)


# ---------------------------------------------------------------------------
# Closed-form table
# ---------------------------------------------------------------------------
def test_table_prints_closed_form_and_slogdet(capsys):
    entropy.main(["--k", "2", "3", "--alpha", "0.5"])
    out = capsys.readouterr().out
    assert "rejected" in out  # alpha = 0.5 with k = 2 is singular
    assert f"{math.log(3) * -1:.6g}" in out  # optimal Q, k = 2: (1 - 2) log 3
