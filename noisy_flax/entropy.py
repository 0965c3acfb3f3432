"""Entropy measures for NoisyNN: closed forms and empirical estimates, in nats.

Three groups of pure functions:

* **Linear-transform noise.** ``log|det(I+Q)|`` for any Q (slogdet) and the
  closed forms for the optimal and circulant Q, plus the paper-style entropy
  change ``d * log|det(I+Q)|`` of k samples with d features.
* **Gaussian closed form.** H(Y|X) for jointly Gaussian X, Y and the change
  H(Y|X+E) - H(Y|X) under independent Gaussian noise E (never negative).
* **Empirical H(Y|Z)** from features Z and integer labels Y: the held-out
  cross-entropy of a linear probe (an upper bound on H(Y|Z)) and a Gaussian
  class-conditional (LDA/QDA-style) estimate, with H(Y) for reference.

``python -m noisy_flax.entropy --k 1 2 10 16 --alpha 0.3 0.4`` prints the
closed-form log-determinants next to numpy's slogdet.
``python -m noisy_flax.entropy --config CONFIG --workdir RUN [--orders ...]``
estimates H(Y|Z) on the features of RUN's latest checkpoint, at the noise
site and the pre-logits, noise on and off, under each test-batch order
(written to RUN/entropy_orders.{json,md}; see ``noisy_flax.evaluate``).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.linalg
import scipy.special

from noisy_flax import noise

LOG_2PI_E = math.log(2.0 * math.pi * math.e)


# ---------------------------------------------------------------------------
# Linear-transform noise: log|det(I + Q)|
# ---------------------------------------------------------------------------
def log_abs_det(q: np.ndarray, *, includes_identity: bool = False) -> float:
    """log|det(I + Q)| for a square Q, via numpy.linalg.slogdet.

    Pass ``includes_identity=True`` when the argument already is I + Q.
    Returns -inf for a singular transform.
    """
    matrix = np.asarray(q, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"Q must be a square matrix, got shape {matrix.shape}")
    if not includes_identity:
        matrix = np.eye(matrix.shape[0]) + matrix
    sign, logdet = np.linalg.slogdet(matrix)
    return float(logdet) if sign != 0 else -math.inf


def optimal_q_log_abs_det(k: int) -> float:
    """log|det(I + Q*)| = (1 - k) log(k + 1) for the optimal Q of size k.

    I + Q* = (J + I) / (k + 1) with J the all-ones matrix; J + I has the
    eigenvalue k + 1 once and 1 (k - 1) times, so det = (k+1) / (k+1)^k.
    """
    _check_positive_int(k)
    return (1 - k) * math.log(k + 1)


def circulant_log_abs_det(k: int, alpha: float) -> float:
    """log|(1 - alpha)^k - (-alpha)^k| = log|det(I + Q)| for Q = alpha (P - I).

    I + Q = (1 - alpha) I + alpha P has eigenvalues (1 - alpha) + alpha w^j
    over the k-th roots of unity w^j, whose product is a^k - b^k with
    a = 1 - alpha, b = -alpha. The larger of |a|, |b| is factored out so that
    large k neither underflows nor loses the difference. -inf when singular
    (alpha = 0.5 with even k).
    """
    _check_positive_int(k)
    a, b = 1.0 - alpha, -alpha
    big, small = (a, b) if abs(a) >= abs(b) else (b, a)
    ratio_power = (small / big) ** k
    with np.errstate(divide="ignore"):
        return float(k * math.log(abs(big)) + np.log1p(-ratio_power))


def linear_transform_entropy_change(q: np.ndarray, feature_dim: int, *,
                                    includes_identity: bool = False) -> float:
    """Change of differential entropy, in nats, when x' = (I + Q) x mixes k
    samples (rows) of a k x d feature matrix: ``d * log|det(I + Q)|``.

    Derivation: for an invertible linear map A of a random vector X,
    p_{AX}(y) = p_X(A^{-1} y) / |det A|, hence H(AX) = H(X) + log|det A|.
    (I + Q) acts on each of the d feature columns separately, so on the
    flattened k*d vector the map is I_d (x) (I + Q) (Kronecker), whose
    determinant is det(I + Q)^d; the change is d * log|det(I + Q)|.

    This is the term the paper's argument is driven by (negative for the
    optimal Q with k > 1). It measures a change of volume of the joint
    features; an invertible map applied to the whole batch leaves the
    information the batch carries about its labels unchanged.
    """
    _check_positive_int(feature_dim)
    return feature_dim * log_abs_det(q, includes_identity=includes_identity)


def within_image_log_abs_det(rows: int, *, q: str = "optimal", alpha: float = 0.4) -> float:
    """log|det(I + Q)| of the rows x rows transform used by within-image noise."""
    if q == "optimal":
        return optimal_q_log_abs_det(rows)
    if q == "circulant":
        return circulant_log_abs_det(rows, alpha)
    raise ValueError(f"unknown within-image q {q!r}; choose 'optimal' or 'circulant'")


def _check_positive_int(n: int) -> None:
    if int(n) != n or n < 1:
        raise ValueError(f"expected a positive integer, got {n!r}")


# ---------------------------------------------------------------------------
# Gaussian closed form
# ---------------------------------------------------------------------------
def gaussian_conditional_entropy(cov_yy: np.ndarray, cov_yx: np.ndarray,
                                 cov_xx: np.ndarray) -> float:
    """H(Y|X) in nats for jointly Gaussian X (dim dx) and Y (dim dy).

    H(Y|X) = 0.5 log((2 pi e)^dy det(S)), S = Sigma_YY - Sigma_YX Sigma_XX^{-1} Sigma_XY.
    S is formed as Sigma_YY - W^T W with W = L^{-1} Sigma_XY, L the Cholesky
    factor of Sigma_XX, which avoids an explicit inverse.
    """
    cov_yy, cov_yx, cov_xx = _check_joint_blocks(cov_yy, cov_yx, cov_xx)
    chol_xx = _cholesky(cov_xx, "Sigma_XX")
    w = scipy.linalg.solve_triangular(chol_xx, cov_yx.T, lower=True)
    schur = cov_yy - w.T @ w
    logdet = _logdet_pd(0.5 * (schur + schur.T), "the conditional covariance of Y given X")
    return 0.5 * (cov_yy.shape[0] * LOG_2PI_E + logdet)


def gaussian_noise_entropy_change(cov_yy: np.ndarray, cov_yx: np.ndarray, cov_xx: np.ndarray,
                                  noise_cov: Any) -> float:
    """H(Y|X+E) - H(Y|X) in nats for E ~ N(0, noise_cov) independent of X, Y.

    E leaves Sigma_YX unchanged and turns Sigma_XX into Sigma_XX + Sigma_E.
    The result is never negative: Sigma_XX^{-1} - (Sigma_XX + Sigma_E)^{-1}
    is positive semi-definite, so the conditional covariance can only grow.
    ``noise_cov`` is a dx x dx matrix, a vector (its diagonal) or a scalar
    (times the identity).
    """
    cov_yy, cov_yx, cov_xx = _check_joint_blocks(cov_yy, cov_yx, cov_xx)
    noisy_xx = cov_xx + _as_covariance(noise_cov, cov_xx.shape[0])
    return (gaussian_conditional_entropy(cov_yy, cov_yx, noisy_xx)
            - gaussian_conditional_entropy(cov_yy, cov_yx, cov_xx))


def _check_joint_blocks(cov_yy, cov_yx, cov_xx):
    cov_yy, cov_yx, cov_xx = (np.atleast_2d(np.asarray(c, np.float64))
                              for c in (cov_yy, cov_yx, cov_xx))
    dy, dx = cov_yy.shape[0], cov_xx.shape[0]
    if cov_yy.shape != (dy, dy) or cov_xx.shape != (dx, dx) or cov_yx.shape != (dy, dx):
        raise ValueError(f"covariance blocks do not fit: Sigma_YY {cov_yy.shape}, "
                         f"Sigma_YX {cov_yx.shape} (must be dy x dx), Sigma_XX {cov_xx.shape}")
    return cov_yy, cov_yx, cov_xx


def _as_covariance(cov: Any, dim: int) -> np.ndarray:
    cov = np.asarray(cov, np.float64)
    if cov.ndim == 0:
        return float(cov) * np.eye(dim)
    if cov.ndim == 1:
        return np.diag(cov)
    if cov.shape != (dim, dim):
        raise ValueError(f"noise covariance has shape {cov.shape}, expected ({dim}, {dim})")
    return cov


def _cholesky(cov: np.ndarray, name: str) -> np.ndarray:
    try:
        return np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        raise ValueError(f"{name} is not positive definite; H(Y|X) is undefined "
                         "(add a small ridge or drop redundant dimensions)") from None


def _logdet_pd(cov: np.ndarray, name: str) -> float:
    return 2.0 * float(np.sum(np.log(np.diag(_cholesky(cov, name)))))


# ---------------------------------------------------------------------------
# Empirical H(Y|Z)
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class EntropyEstimate:
    """An estimate of H(Y|Z) in nats on a held-out set.

    ``value`` is the mean of -log p(y|z) over the test set, ``stderr`` its
    standard error, ``accuracy`` that of argmax p(y|z), ``label_entropy``
    H(Y) of the test labels (the value for features that carry nothing).
    """
    value: float
    stderr: float
    accuracy: float
    label_entropy: float
    method: str
    n_train: int
    n_test: int
    num_classes: int
    feature_dim: int
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["settings"] = dict(self.settings)
        return out


def label_entropy(y: np.ndarray, num_classes: int) -> float:
    """H(Y) in nats of the empirical label distribution (plug-in estimate)."""
    counts = np.bincount(_check_labels(y, num_classes), minlength=num_classes)
    p = counts[counts > 0] / counts.sum()
    return float(-np.sum(p * np.log(p)))


def probe_conditional_entropy(z_train: np.ndarray, y_train: np.ndarray,
                              z_test: np.ndarray, y_test: np.ndarray, num_classes: int, *,
                              l2: float = 1e-4, steps: int = 500,
                              tol: float = 1e-6) -> EntropyEstimate:
    """Held-out cross-entropy (nats) of a multinomial logistic regression.

    Features are standardised with train statistics; the probe minimises
    mean cross-entropy + l2/2 ||W||^2 (bias not penalised) with full-batch
    L-BFGS from zero, which is deterministic. Any predictor's expected
    held-out cross-entropy bounds H(Y|Z) from above, so this is an upper bound
    up to sampling error (``stderr``).
    """
    z_train, y_train, z_test, y_test = _check_split(z_train, y_train, z_test, y_test, num_classes)
    mean, scale = _standardiser(z_train)
    params, steps_run = _fit_probe(
        jnp.asarray((z_train - mean) / scale, jnp.float32), jnp.asarray(y_train),
        num_classes, l2=l2, steps=steps, tol=tol)
    logits = _probe_logits(params, jnp.asarray((z_test - mean) / scale, jnp.float32))
    log_probs = np.asarray(jax.nn.log_softmax(logits), np.float64)
    return _estimate(log_probs, y_test, method="linear_probe", n_train=len(y_train),
                     feature_dim=z_train.shape[1],
                     settings=dict(l2=l2, max_steps=steps, steps_run=steps_run, tol=tol))


def gaussian_class_conditional_entropy(z_train: np.ndarray, y_train: np.ndarray,
                                       z_test: np.ndarray, y_test: np.ndarray,
                                       num_classes: int, *, shrinkage: float = 0.1,
                                       covariance: str = "shared",
                                       ridge: float = 1e-6) -> EntropyEstimate:
    """Mean -log p(y|z) (nats) on the test set under class-conditional Gaussians.

    p(z|y) = N(mu_y, Sigma) with Sigma shared (``covariance='shared'``, LDA)
    or per class (``'per_class'``, QDA); priors p(y) from the train counts.
    Features are standardised with train statistics; each covariance is
    shrunk toward its diagonal, (1 - s) Sigma + s diag(Sigma), plus
    ``ridge`` * I so that features constant within a class stay usable.
    Classes absent from the training set get prior 0; a test label from
    such a class is an error.
    """
    if covariance not in ("shared", "per_class"):
        raise ValueError(f"unknown covariance {covariance!r}; choose 'shared' or 'per_class'")
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"shrinkage={shrinkage} must lie in [0, 1]")
    z_train, y_train, z_test, y_test = _check_split(z_train, y_train, z_test, y_test, num_classes)
    mean, scale = _standardiser(z_train)
    z_train, z_test = (z_train - mean) / scale, (z_test - mean) / scale

    counts = np.bincount(y_train, minlength=num_classes)
    missing = sorted(set(np.unique(y_test)) - set(np.flatnonzero(counts)))
    if missing:
        raise ValueError(f"test labels {missing} never occur in the training split; "
                         "the Gaussian estimate needs every test class in training")
    present = np.flatnonzero(counts)
    means = {c: z_train[y_train == c].mean(axis=0) for c in present}
    chols = _class_cholesky(z_train, y_train, means, covariance, shrinkage, ridge)

    log_joint = np.full((len(z_test), num_classes), -np.inf)
    for c in present:
        log_joint[:, c] = (math.log(counts[c] / counts.sum())
                           + _gaussian_log_density(z_test, means[c], chols[c]))
    log_post = log_joint - scipy.special.logsumexp(log_joint, axis=1, keepdims=True)
    return _estimate(log_post, y_test, method=f"gaussian_{covariance}", n_train=len(y_train),
                     feature_dim=z_train.shape[1],
                     settings=dict(shrinkage=shrinkage, covariance=covariance, ridge=ridge))


def _class_cholesky(z, y, means, covariance, shrinkage, ridge) -> dict[int, np.ndarray]:
    """Cholesky factor of each class's (shrunk, ridged) covariance."""
    if covariance == "shared":
        centred = np.concatenate([z[y == c] - m for c, m in means.items()])
        chol = np.linalg.cholesky(_shrink(_second_moment(centred), shrinkage, ridge))
        return {c: chol for c in means}
    return {c: np.linalg.cholesky(_shrink(_second_moment(z[y == c] - m), shrinkage, ridge))
            for c, m in means.items()}


def _second_moment(centred: np.ndarray) -> np.ndarray:
    """Maximum-likelihood covariance of already centred rows."""
    return centred.T @ centred / len(centred)


def _shrink(cov: np.ndarray, shrinkage: float, ridge: float) -> np.ndarray:
    diag = np.diag(np.diag(cov))
    return (1.0 - shrinkage) * cov + shrinkage * diag + ridge * np.eye(len(cov))


def _gaussian_log_density(z: np.ndarray, mean: np.ndarray, chol: np.ndarray) -> np.ndarray:
    white = scipy.linalg.solve_triangular(chol, (z - mean).T, lower=True)
    logdet = 2.0 * np.sum(np.log(np.diag(chol)))
    return -0.5 * (np.sum(white ** 2, axis=0) + logdet + z.shape[1] * math.log(2 * math.pi))


def _standardiser(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Train mean and scale; a (numerically) constant feature keeps scale 1,
    so that rounding noise is not blown up into a feature."""
    mean, std = z.mean(axis=0), z.std(axis=0)
    constant = std <= 1e-8 * (1.0 + np.abs(mean))
    return mean, np.where(constant, 1.0, std)


def _fit_probe(z: jax.Array, y: jax.Array, num_classes: int, *, l2: float, steps: int,
               tol: float) -> tuple[dict[str, jax.Array], int]:
    params = {"w": jnp.zeros((z.shape[1], num_classes), jnp.float32),
              "b": jnp.zeros((num_classes,), jnp.float32)}
    params, steps_run = _run_lbfgs(params, z, y, l2, steps, tol)
    return params, int(steps_run)


@jax.jit(static_argnames=("steps",))
def _run_lbfgs(params, z, y, l2, steps, tol):
    def loss(p):
        ce = optax.softmax_cross_entropy_with_integer_labels(_probe_logits(p, z), y).mean()
        return ce + 0.5 * l2 * jnp.sum(p["w"] ** 2)

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def step(carry):
        p, state, i, _ = carry
        value, grad = value_and_grad(p, state=state)
        updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=loss)
        return optax.apply_updates(p, updates), state, i + 1, optax.tree.norm(grad)

    def keep_going(carry):
        _, _, i, grad_norm = carry
        return (i < steps) & (grad_norm > tol)

    init = (params, opt.init(params), jnp.asarray(0), jnp.asarray(jnp.inf, jnp.float32))
    params, _, steps_run, _ = jax.lax.while_loop(keep_going, step, init)
    return params, steps_run


def _probe_logits(params, z):
    return z @ params["w"] + params["b"]


def _estimate(log_probs: np.ndarray, y_test: np.ndarray, *, method: str, n_train: int,
              feature_dim: int, settings: dict) -> EntropyEstimate:
    """Summarises per-example log p(y|z) into an EntropyEstimate."""
    nll = -log_probs[np.arange(len(y_test)), y_test]
    n, num_classes = log_probs.shape
    return EntropyEstimate(
        value=float(nll.mean()),
        stderr=float(nll.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan,
        accuracy=float(np.mean(np.argmax(log_probs, axis=1) == y_test)),
        label_entropy=label_entropy(y_test, num_classes), method=method,
        n_train=n_train, n_test=n, num_classes=num_classes, feature_dim=feature_dim,
        settings=settings)


def _check_labels(y: np.ndarray, num_classes: int) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got dtype {y.dtype}, "
                         f"shape {y.shape}")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{y.min()}, {y.max()}]")
    return y


def _check_split(z_train, y_train, z_test, y_test, num_classes):
    z_train, z_test = (np.asarray(z, np.float64) for z in (z_train, z_test))
    y_train, y_test = (_check_labels(y, num_classes) for y in (y_train, y_test))
    for name, z, y in (("train", z_train, y_train), ("test", z_test, y_test)):
        if z.ndim != 2 or len(z) != len(y) or len(z) == 0:
            raise ValueError(f"{name} features must be (n, d) with n = len(labels) > 0, "
                             f"got {z.shape} and {y.shape}")
        if not np.all(np.isfinite(z)):
            raise ValueError(f"{name} features contain NaN or inf")
    if z_train.shape[1] != z_test.shape[1]:
        raise ValueError(f"train and test feature sizes differ: "
                         f"{z_train.shape[1]} vs {z_test.shape[1]}")
    return z_train, y_train, z_test, y_test


# ---------------------------------------------------------------------------
# Closed-form table
# ---------------------------------------------------------------------------
def closed_form_rows(ks: Sequence[int], alphas: Sequence[float]) -> list[dict[str, Any]]:
    """log|det(I+Q)| per k: closed form and slogdet of the matrices in noise.py.

    A circulant setting that noise.py rejects (alpha = 0.5 with even k) has
    slogdet None.
    """
    rows = []
    for k in ks:
        row = {"k": k, "optimal": optimal_q_log_abs_det(k),
               "optimal_slogdet": log_abs_det(noise.optimal_q(k))}
        for alpha in alphas:
            row[f"circulant_{alpha:g}"] = circulant_log_abs_det(k, alpha)
            try:
                row[f"circulant_{alpha:g}_slogdet"] = log_abs_det(noise.circulant_q(k, alpha))
            except ValueError:
                row[f"circulant_{alpha:g}_slogdet"] = None
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of ``closed_form_rows``."""
    header = list(rows[0])
    cell = lambda v: "rejected" if v is None else (str(v) if isinstance(v, int) else f"{v:.6g}")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(row[h]) for h in header) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a.startswith(("--config", "--workdir")) for a in args):
        # Checkpoint mode: H(Y|Z) on features of a trained model under every
        # batch order (see noisy_flax.evaluate; flags --orders, --batch_size, ...).
        from noisy_flax import evaluate
        evaluate.main_with_flags([sys.argv[0]] + args, entropy_default=True)
        return
    parser = argparse.ArgumentParser(
        description="log|det(I+Q)| in nats per feature dimension, closed form vs slogdet",
        epilog="With --config CONFIG --workdir RUN instead: H(Y|Z) estimates on the features of "
               "RUN's latest checkpoint under each test-batch order (the flags of "
               "python -m noisy_flax.evaluate --help).")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 10, 16])
    parser.add_argument("--alpha", type=float, nargs="*", default=[0.3, 0.4])
    args = parser.parse_args(argv)
    if min(args.k) < 1:
        parser.exit(2, f"error: --k takes batch sizes of at least 1, got {min(args.k)}\n")
    try:
        rows = closed_form_rows(args.k, args.alpha)
    except ValueError as error:
        parser.exit(2, f"error: {str(error).splitlines()[0]}\n")
    print(format_table(rows))


if __name__ == "__main__":
    main()
