"""Noise functions against numpy references and closed forms."""
import functools
import re
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from noisy_flax import noise


def published_optimal_q(x):
    """The published per-sample formula, written out in numpy."""
    k = x.shape[0]
    out = np.empty_like(x)
    for b in range(k):
        others = sum(x[j] for j in range(k) if j != b)
        out[b] = x[b] - x[b] * (k - 1) / (k + 1) + others / (k + 1)
    return out


def numpy_circulant(x, alpha):
    k = x.shape[0]
    return np.stack([(1 - alpha) * x[b] + alpha * x[(b + 1) % k] for b in range(k)])


@pytest.fixture
def batch():
    return np.random.default_rng(0).normal(size=(10, 5, 3)).astype(np.float32)


class TestQualityMatrices:
    @pytest.mark.parametrize("k", [1, 2, 7, 10, 16])
    def test_optimal_q_rows_of_i_plus_q_sum_to_one(self, k):
        np.testing.assert_allclose((np.eye(k) + noise.optimal_q(k)).sum(1), np.ones(k), atol=1e-12)

    def test_optimal_q_diagonal_and_off_diagonal(self):
        m = np.eye(10) + noise.optimal_q(10)
        np.testing.assert_allclose(np.diag(m), 2 / 11)
        np.testing.assert_allclose(m[0, 1:], 1 / 11)

    @pytest.mark.parametrize("k", [1, 2, 5, 10, 32])
    def test_optimal_q_log_det_closed_form(self, k):
        sign, logdet = np.linalg.slogdet(np.eye(k) + noise.optimal_q(k))
        assert sign != 0
        np.testing.assert_allclose(logdet, (1 - k) * np.log(k + 1), atol=1e-9)

    @pytest.mark.parametrize("k,alpha", [(2, 0.3), (3, 0.5), (10, 0.4), (7, 0.9), (16, 0.1)])
    def test_circulant_det_closed_form(self, k, alpha):
        det = np.linalg.det(np.eye(k) + noise.circulant_q(k, alpha))
        np.testing.assert_allclose(det, (1 - alpha) ** k - (-alpha) ** k, atol=1e-12)

    @pytest.mark.parametrize("k,alpha", [(2, 0.5), (10, 0.5), (4, 1.0), (3, -0.1)])
    def test_impossible_circulant_raises(self, k, alpha):
        with pytest.raises(ValueError, match="alpha"):
            noise.circulant_q(k, alpha)

    @pytest.mark.parametrize("k", range(1, 9))
    def test_circulant_rejected_exactly_when_singular_or_out_of_range(self, k):
        for alpha in (0.0, 0.1, 0.3, 0.4, 0.5, 0.7, 0.99, 1.0, -0.2):
            shift = np.roll(np.eye(k), 1, axis=1)  # built here, not by the package
            singular = abs(np.linalg.det((1 - alpha) * np.eye(k) + alpha * shift)) < 1e-12
            if singular or not 0 <= alpha < 1:
                with pytest.raises(ValueError, match="alpha"):
                    noise.check_circulant(k, alpha)
            else:
                noise.check_circulant(k, alpha)

    def test_padded_batch_at_half_is_rejected_since_any_real_count_can_occur(self):
        # 3 rows, 2 real: among the real rows I+Q is [[.5, .5], [.5, .5]], singular,
        # although the padded size 3 is odd.
        x = jnp.asarray([[1.0, 2.0], [3.0, 5.0], [0.0, 0.0]])
        mask = jnp.asarray([True, True, False])
        assert np.linalg.matrix_rank(np.full((2, 2), 0.5)) == 1
        with pytest.raises(ValueError, match="padded"):
            noise.circulant_noise(x, alpha=0.5, mask=mask)
        noise.circulant_noise(x, alpha=0.5)  # unpadded, k = 3: invertible, accepted

    def test_one_padded_row_at_half_is_accepted_and_unchanged(self):
        # One row holds 0 or 1 real samples; a lone sample's neighbour is
        # itself, so (1 - a) x + a x = x for any alpha, 0.5 included.
        x = jnp.asarray([[1.0, -2.0]])
        out = noise.circulant_noise(x, alpha=0.5, mask=jnp.asarray([True]))
        np.testing.assert_allclose(out, [[1.0, -2.0]])

    @pytest.mark.parametrize("build", [noise.optimal_q, lambda k: noise.circulant_q(k, 0.3)])
    @pytest.mark.parametrize("k", [0, -1, 2.5])
    def test_mixing_size_must_be_a_positive_integer(self, build, k):
        with pytest.raises(ValueError, match="positive integer"):
            build(k)


class TestLinearTransform:
    def test_optimal_q_matches_published_formula(self, batch):
        np.testing.assert_allclose(noise.optimal_q_noise(jnp.asarray(batch)),
                                   published_optimal_q(batch), rtol=1e-5, atol=1e-6)

    def test_optimal_q_equals_general_linear_transform(self, batch):
        general = noise.linear_transform_noise(jnp.asarray(batch), noise.optimal_q(10))
        np.testing.assert_allclose(general, published_optimal_q(batch), rtol=1e-5, atol=1e-6)

    def test_general_q_refuses_a_mask(self, batch):
        # A general Q has no rule for skipping padded rows: refuse, not ignore.
        with pytest.raises(ValueError, match="cannot skip padded rows"):
            noise.linear_transform_noise(jnp.asarray(batch), noise.optimal_q(10),
                                         mask=jnp.ones(10, bool))

    def test_optimal_q_identity_at_k1(self, batch):
        np.testing.assert_allclose(noise.optimal_q_noise(jnp.asarray(batch[:1])), batch[:1], atol=1e-7)

    def test_optimal_q_mask_mixes_real_rows_only(self, batch):
        mask = np.array([1] * 6 + [0] * 4, bool)
        out = noise.optimal_q_noise(jnp.asarray(batch), mask=jnp.asarray(mask))
        np.testing.assert_allclose(out[:6], published_optimal_q(batch[:6]), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(out[6:], batch[6:])

    def test_optimal_q_gradient_is_i_plus_q_transposed(self):
        x = jnp.arange(4.0)
        jac = jax.jacobian(noise.optimal_q_noise)(x)
        np.testing.assert_allclose(jac, np.eye(4) + noise.optimal_q(4), atol=1e-6)

    def test_masked_optimal_q_jacobian_is_block_diagonal(self):
        mask = jnp.asarray([True, True, True, False, False])
        jac = jax.jacobian(functools.partial(noise.optimal_q_noise, mask=mask))(jnp.arange(5.0))
        expected = np.eye(5)
        expected[:3, :3] += noise.optimal_q(3)
        np.testing.assert_allclose(jac, expected, atol=1e-6)

    def test_a_nan_in_a_padded_row_stays_there(self, batch):
        x = batch.copy()
        x[8] = np.nan
        mask = jnp.asarray(np.arange(10) < 6)
        out = np.asarray(noise.optimal_q_noise(jnp.asarray(x), mask=mask))
        np.testing.assert_allclose(out[:6], published_optimal_q(batch[:6]), rtol=1e-5, atol=1e-6)
        assert np.isnan(out[8]).all()

    @pytest.mark.parametrize("masked", [False, True])
    def test_optimal_q_and_its_gradient_compile_without_a_batch_sum(self, masked):
        """XLA:CPU runs a sum over a short leading axis of long rows 50x slower
        than a product with a ones vector (BENCHMARKS.md); neither the noise
        nor its gradient may hold one (only the scalar count of real rows)."""
        x = jnp.ones((32, 197, 192))
        mask = jnp.arange(32) < 30 if masked else None

        def forward_backward(x, g):
            y, vjp = jax.vjp(functools.partial(noise.optimal_q_noise, mask=mask), x)
            return y, vjp(g)[0]
        hlo = jax.jit(forward_backward).lower(x, x).compile().as_text()
        assert re.search(r"= f32\[\d[\d,]*\]\S* reduce\(", hlo) is None
        assert len(re.findall(r" dot\(", hlo)) >= 2  # the sums, forward and backward

    @pytest.mark.parametrize("fn", [
        noise.optimal_q_noise,
        functools.partial(noise.optimal_q_noise, mask=jnp.arange(6) < 4),
        lambda x: noise.linear_transform_noise(x, noise.circulant_q(6, 0.3)),
        noise.within_image_noise])
    def test_products_ask_for_full_float32_precision(self, fn):
        """TPUs multiply float32 in bfloat16 pieces by default and GPUs in
        TF32: the mixed samples would be rounded to about 3 digits."""
        x = jnp.ones((6, 4, 4, 2))
        for lowered in (jax.jit(fn).lower(x),
                        jax.jit(jax.grad(lambda x: jnp.sum(fn(x) ** 2))).lower(x)):
            dots = re.findall(r"stablehlo.dot_general[^\n]*", lowered.as_text())
            assert dots and all("precision = [HIGHEST, HIGHEST]" in d for d in dots), dots

    @pytest.mark.parametrize("alpha", [0.3, 0.4])
    def test_circulant_matches_numpy(self, batch, alpha):
        out = noise.circulant_noise(jnp.asarray(batch), alpha=alpha)
        np.testing.assert_allclose(out, numpy_circulant(batch, alpha), rtol=1e-5, atol=1e-6)

    def test_circulant_mask_cycles_over_real_rows(self, batch):
        mask = np.array([1, 0, 1, 1, 0, 1, 0, 0, 0, 0], bool)
        out = np.asarray(noise.circulant_noise(jnp.asarray(batch), alpha=0.3, mask=jnp.asarray(mask)))
        real = np.flatnonzero(mask)
        np.testing.assert_allclose(out[real], numpy_circulant(batch[real], 0.3), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(out[~mask], batch[~mask])

    def test_circulant_stop_gradient(self):
        x = jnp.arange(5.0)
        plain = jax.jacobian(lambda v: noise.circulant_noise(v, alpha=0.4))(x)
        stopped = jax.jacobian(lambda v: noise.circulant_noise(v, alpha=0.4, stop_gradient=True))(x)
        np.testing.assert_allclose(plain, np.eye(5) + noise.circulant_q(5, 0.4), atol=1e-6)
        np.testing.assert_allclose(stopped, np.eye(5), atol=1e-7)
        # The forward value is unchanged by stopping the gradient.
        np.testing.assert_allclose(noise.circulant_noise(x, alpha=0.4, stop_gradient=True),
                                   numpy_circulant(np.arange(5.0), 0.4), atol=1e-6)

    def test_circulant_even_batch_at_half_raises(self, batch):
        with pytest.raises(ValueError, match="singular"):
            noise.circulant_noise(jnp.asarray(batch), alpha=0.5)

    def test_within_image_mixes_rows_inside_each_sample(self):
        x = np.random.default_rng(1).normal(size=(3, 4, 5, 2)).astype(np.float32)
        out = np.asarray(noise.within_image_noise(jnp.asarray(x)))
        m = np.eye(4) + noise.optimal_q(4)
        expected = np.einsum("rs,bscd->brcd", m, x)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
        # No leak: changing sample 0 leaves samples 1.. unchanged.
        x2 = x.copy(); x2[0] += 100
        np.testing.assert_allclose(np.asarray(noise.within_image_noise(jnp.asarray(x2)))[1:], out[1:], atol=1e-5)

    def test_within_image_circulant_matches_numpy(self):
        x = np.random.default_rng(2).normal(size=(2, 5, 3, 2)).astype(np.float32)
        out = np.asarray(noise.within_image_noise(jnp.asarray(x), q="circulant", alpha=0.3))
        expected = np.swapaxes(numpy_circulant(np.swapaxes(x, 0, 1), 0.3), 0, 1)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)

    def test_jit_and_vmap(self, batch):
        jitted = jax.jit(noise.optimal_q_noise)(jnp.asarray(batch))
        np.testing.assert_allclose(jitted, published_optimal_q(batch), rtol=1e-5, atol=1e-6)
        stacked = np.stack([batch, 2 * batch])
        vmapped = jax.vmap(noise.optimal_q_noise)(jnp.asarray(stacked))
        np.testing.assert_allclose(vmapped[1], published_optimal_q(2 * batch), rtol=1e-5, atol=1e-5)


class TestRandomNoise:
    def test_gaussian_moments(self):
        x = jnp.zeros((200, 500))
        out = np.asarray(noise.gaussian_noise(x, key=jax.random.key(0), strength=0.5, mean=1.0, std=2.0))
        n = out.size
        # mean = 0.5 * 1 = 0.5, std = 0.5 * 2 = 1; bounds of 6 standard errors.
        assert abs(out.mean() - 0.5) < 6 * 1.0 / np.sqrt(n)
        assert abs(out.std() - 1.0) < 6 * 1.0 / np.sqrt(2 * n)

    def test_same_key_same_noise(self):
        x = jnp.ones((4, 8))
        a = noise.gaussian_noise(x, key=jax.random.key(3))
        b = noise.gaussian_noise(x, key=jax.random.key(3))
        c = noise.gaussian_noise(x, key=jax.random.key(4))
        np.testing.assert_array_equal(a, b)
        assert not np.allclose(a, c)

    def test_gaussian_requires_key(self):
        with pytest.raises(ValueError, match="key"):
            noise.gaussian_noise(jnp.ones(3), key=None)

    def test_salt_pepper_requires_key(self):
        with pytest.raises(ValueError, match="salt_pepper noise is random: pass key="):
            noise.salt_pepper_noise(jnp.ones((2, 3)), key=None, prob=0.1)

    @pytest.mark.parametrize("kwargs, message", [
        ({"std": -1.0}, "gaussian std=-1.0 is a standard deviation"),
        ({"strength": float("nan")}, "gaussian strength=nan must be a finite number"),
        ({"mean": float("inf")}, "gaussian mean=inf must be a finite number")])
    def test_gaussian_refuses_impossible_settings(self, kwargs, message):
        with pytest.raises(ValueError, match=message):
            noise.gaussian_noise(jnp.ones(3), key=jax.random.key(0), **kwargs)
        traced = jax.jit(lambda s: noise.gaussian_noise(jnp.ones(3), key=jax.random.key(0), std=s))
        assert traced(0.5).shape == (3,)  # a traced std is not checked, and works

    def test_salt_pepper_flip_fraction_and_values(self):
        x = jnp.asarray(np.random.default_rng(2).normal(size=(100, 1000)).astype(np.float32))
        p = 0.3
        out = np.asarray(noise.salt_pepper_noise(x, key=jax.random.key(0), prob=p))
        xs = np.asarray(x)
        high, low = xs.max(), xs.min()
        n = out.size
        salt, pepper = np.mean(out == high), np.mean(out == low)
        bound = 6 * np.sqrt((p / 2) * (1 - p / 2) / n)
        assert abs(salt - p / 2) < bound + 1 / n
        assert abs(pepper - p / 2) < bound + 1 / n
        # Element by element against the documented rule, from the same draw:
        # u < p/2 -> maximum, p/2 <= u < p -> minimum, else unchanged.
        u = np.asarray(jax.random.uniform(jax.random.key(0), x.shape))
        np.testing.assert_array_equal(out, np.where(u < p / 2, high, np.where(u < p, low, xs)))

    @pytest.mark.parametrize("prob", [-0.1, 1.5])
    def test_salt_pepper_prob_outside_0_1_raises(self, prob):
        with pytest.raises(ValueError, match=f"prob={prob} is not a probability"):
            noise.salt_pepper_noise(jnp.ones((2, 3)), key=jax.random.key(0), prob=prob)

    def test_salt_pepper_gradient_is_zero_on_replaced_values(self):
        x = jnp.asarray(np.random.default_rng(3).normal(size=(8, 16)).astype(np.float32))
        key = jax.random.key(1)
        out = noise.salt_pepper_noise(x, key=key, prob=0.5)
        grad = np.asarray(jax.grad(lambda v: noise.salt_pepper_noise(v, key=key, prob=0.5).sum())(x))
        replaced = np.asarray(out != x)
        assert replaced.any() and (~replaced).any()
        np.testing.assert_array_equal(grad[replaced], 0.0)
        np.testing.assert_array_equal(grad[~replaced], 1.0)

    def test_salt_pepper_extremes_ignore_padding(self):
        x = jnp.asarray([[1.0, 2.0], [3.0, 4.0], [100.0, -100.0]])
        out = np.asarray(noise.salt_pepper_noise(x, key=jax.random.key(0), prob=1.0,
                                                 mask=jnp.asarray([True, True, False])))
        assert set(np.unique(out[:2])) <= {1.0, 4.0}
        np.testing.assert_array_equal(out[2], [100.0, -100.0])  # padding untouched

    def test_salt_pepper_extremes_of_an_all_negative_batch(self):
        # The real maximum is -2, below any neutral fill value such as 0.
        x = jnp.asarray([[-5.0, -3.0], [-4.0, -2.0], [0.0, 0.0]])
        out = np.asarray(noise.salt_pepper_noise(x, key=jax.random.key(0), prob=1.0,
                                                 mask=jnp.asarray([True, True, False])))
        assert set(np.unique(out[:2])) <= {-5.0, -2.0}
        np.testing.assert_array_equal(out[2], [0.0, 0.0])


class TestKeepLeadingTokens:
    def test_class_token_untouched(self, batch):
        fn = noise.keep_leading_tokens(noise.optimal_q_noise, 1)
        out = np.asarray(fn(jnp.asarray(batch)))
        np.testing.assert_array_equal(out[:, 0], batch[:, 0])
        np.testing.assert_allclose(out[:, 1:], published_optimal_q(batch[:, 1:]), rtol=1e-5, atol=1e-6)

    def test_two_leading_tokens_untouched(self, batch):
        # E.g. a class and a distillation token.
        out = np.asarray(noise.keep_leading_tokens(noise.optimal_q_noise, 2)(jnp.asarray(batch)))
        np.testing.assert_array_equal(out[:, :2], batch[:, :2])
        np.testing.assert_allclose(out[:, 2:], published_optimal_q(batch[:, 2:]), rtol=1e-5, atol=1e-6)

    def test_zero_leading_tokens_noises_every_token(self, batch):
        out = noise.keep_leading_tokens(noise.optimal_q_noise, 0)(jnp.asarray(batch))
        np.testing.assert_allclose(out, published_optimal_q(batch), rtol=1e-5, atol=1e-6)


class TestMakeNoise:
    def test_none_gives_none(self):
        assert noise.make_noise({"type": "none"}) is None
        assert noise.make_noise(None) is None

    def test_fields_carried(self):
        n = noise.make_noise(ml_collections.ConfigDict(
            {"type": "circulant", "alpha": 0.3, "site": "block_input", "layer": 2,
             "train": False, "eval": True, "scope": "global"}))
        assert (n.site, n.layer, n.train, n.eval, n.name) == ("block_input", 2, False, True, "circulant")
        x = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
        np.testing.assert_allclose(n.fn(jnp.asarray(x)), numpy_circulant(x, 0.3), rtol=1e-5, atol=1e-6)

    def test_config_defaults_are_the_published_values(self):
        # NOISYNN.md: Gaussian s = 0.1 (ViT), mu = 0, sigma = 1; circulant alpha
        # 0.4 (the CNN script); the published scope is the per-device batch.
        cfg = noise.noise_config()
        assert (cfg.strength, cfg.mean, cfg.std, cfg.alpha, cfg.scope) == (0.1, 0.0, 1.0, 0.4, "device")
        assert cfg.train is True and cfg.eval is True  # the published CNN: noise in both

    def test_config_default_site_is_the_published_one(self):
        # NOISYNN.md: the attention input of the last ViT block; ResNet stage 4.
        cfg = noise.noise_config()
        assert (cfg.site, cfg.layer, cfg.stage) == ("attn_input", -1, 4)

    @pytest.mark.parametrize("stage", [1, 2])
    def test_stage_carried_from_layer1_on(self, stage):
        # Stages count like torchvision's layer1..layer4.
        n = noise.make_noise({"type": "optimal_q", "site": "block_input", "stage": stage,
                              "scope": "global"})
        assert n.stage == stage

    @pytest.mark.parametrize("kind,random", [("optimal_q", False), ("circulant", False),
                                             ("within_image", False), ("gaussian", True),
                                             ("salt_pepper", True)])
    def test_only_random_noise_needs_a_key(self, kind, random):
        assert noise.make_noise({"type": kind, "scope": "global"}).needs_key is random

    def test_train_and_eval_switches(self):
        # The published ViT: noise off in training, on at test time.
        n = noise.Noise(fn=noise.optimal_q_noise, train=False, eval=True)
        assert n.active(train=False) and not n.active(train=True)

    def test_noise_refuses_an_unknown_site(self):
        with pytest.raises(ValueError, match="unknown noise site 'head'"):
            noise.Noise(fn=noise.optimal_q_noise, site="head")

    def test_make_noise_passes_stop_gradient(self):
        x = jnp.arange(5.0)
        for stop, expected in [(True, np.eye(5)), (False, 0.6 * np.eye(5) + 0.4 * np.roll(np.eye(5), 1, 1))]:
            n = noise.make_noise({"type": "circulant", "alpha": 0.4, "stop_gradient": stop,
                                  "scope": "global"})
            # Row b of the Jacobian is d x'_b / d x; stopped, the added Qx has none.
            np.testing.assert_allclose(jax.jacobian(n.fn)(x), expected, atol=1e-6)

    def test_make_noise_passes_gaussian_parameters(self):
        # std = 0 leaves the closed form x + strength * mean, whatever the key.
        n = noise.make_noise({"type": "gaussian", "strength": 2.0, "mean": 3.0, "std": 0.0,
                              "scope": "global"})
        x = jnp.arange(6.0).reshape(3, 2)
        np.testing.assert_allclose(n.fn(x, key=jax.random.key(0)), np.arange(6.0).reshape(3, 2) + 6.0)

    def test_make_noise_passes_within_image_circulant_alpha(self):
        # 0.3, not the default 0.4: rows of each sample mixed as in eq. 17.
        n = noise.make_noise({"type": "within_image", "q": "circulant", "alpha": 0.3,
                              "scope": "global"})
        x = np.random.default_rng(4).normal(size=(2, 5, 3, 2)).astype(np.float32)
        expected = np.swapaxes(numpy_circulant(np.swapaxes(x, 0, 1), 0.3), 0, 1)
        np.testing.assert_allclose(n.fn(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-6)

    @pytest.mark.parametrize("prob", [0.0, 1.0])
    def test_make_noise_passes_salt_pepper_prob(self, prob):
        n = noise.make_noise({"type": "salt_pepper", "prob": prob, "scope": "global"})
        x = np.random.default_rng(3).normal(size=(4, 50)).astype(np.float32)
        out = np.asarray(n.fn(jnp.asarray(x), key=jax.random.key(0)))
        replaced = np.isin(out, [x.max(), x.min()]) & (out != x)
        assert replaced.mean() == pytest.approx(prob, abs=0.02)

    @pytest.mark.parametrize("cfg,message", [
        ({"type": "optimal"}, "did you mean 'optimal_q'"),
        ({"type": "gaussian", "strenght": 1.0}, "did you mean 'strength'"),
        ({"type": "circulant", "alpha": 1.0}, "alpha"),
        ({"type": "salt_pepper", "prob": 1.5}, "prob"),
        ({"type": "gaussian", "site": "head"}, "site"),
        ({"type": "gaussian", "scope": "host"}, "scope"),
        ({"type": "optimal_q", "site": "block_input", "stage": 0}, "numbered from 1"),
        ({"type": "within_image", "q": "circulant", "alpha": 1.0}, "alpha"),
        ({"type": "within_image", "q": "optimum"}, "did you mean 'optimal'"),
        ({"type": "gaussian", "std": -1.0}, "noise.std=-1.0 is negative"),
    ])
    def test_bad_config_is_one_clear_error(self, cfg, message):
        with pytest.raises(ValueError, match=message):
            noise.make_noise(cfg)

    def test_device_scope_without_mesh_on_many_devices_refuses_to_guess(self, batch):
        n = noise.make_noise({"type": "optimal_q", "scope": "device"})
        with pytest.raises(ValueError, match="mesh"):
            n.fn(jnp.asarray(np.zeros((8, 2), np.float32)))

    def test_device_scope_on_a_single_device_needs_no_mesh(self, monkeypatch):
        # One device holds the whole batch: its batch is the per-device batch.
        monkeypatch.setattr(jax, "device_count", lambda: 1)
        n = noise.make_noise({"type": "optimal_q", "scope": "device"})
        x = np.random.default_rng(12).normal(size=(6, 2)).astype(np.float32)
        np.testing.assert_allclose(n.fn(jnp.asarray(x)), published_optimal_q(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cfg", [
    {"type": "optimal_q"}, {"type": "circulant"}, {"type": "within_image"},
    {"type": "gaussian"}, {"type": "salt_pepper", "prob": 0.3}])
def test_bfloat16_input_keeps_its_dtype_and_values(cfg):
    """A bf16 model hands the noise bf16 activations: the result stays bf16
    and equals the float32 result up to bf16 rounding (8 significant bits)."""
    n = noise.make_noise({**cfg, "scope": "global"})
    x = np.random.default_rng(11).normal(size=(6, 4, 4, 3)).astype(np.float32)
    key = jax.random.key(2)
    half = n.fn(jnp.asarray(x, jnp.bfloat16), key=key)
    full = n.fn(jnp.asarray(jnp.asarray(x, jnp.bfloat16), jnp.float32), key=key)
    assert half.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(half, np.float32), full, rtol=2 ** -7, atol=2 ** -7)


class TestScope:
    @pytest.fixture
    def mesh(self):
        return Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))

    def _sharded(self, mesh, x):
        return jax.device_put(x, NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))

    def test_device_scope_equals_reference_per_shard(self, mesh):
        x = np.random.default_rng(5).normal(size=(16, 3, 2)).astype(np.float32)
        n = noise.make_noise({"type": "optimal_q", "scope": "device"}, mesh=mesh)
        out = np.asarray(jax.jit(n.fn)(self._sharded(mesh, x)))
        expected = np.concatenate([published_optimal_q(s) for s in np.split(x, 8)])
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)

    def test_device_scope_circulant_per_shard(self, mesh):
        x = np.random.default_rng(6).normal(size=(24, 4)).astype(np.float32)
        n = noise.make_noise({"type": "circulant", "alpha": 0.4, "scope": "device"}, mesh=mesh)
        out = np.asarray(jax.jit(n.fn)(self._sharded(mesh, x)))
        expected = np.concatenate([numpy_circulant(s, 0.4) for s in np.split(x, 8)])
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)

    def test_device_scope_mask_mixes_the_real_rows_of_each_shard(self, mesh):
        # A padded eval batch: each device mixes its own real rows only; one
        # shard is all padding.
        x = np.random.default_rng(13).normal(size=(16, 3)).astype(np.float32)
        mask = np.array([1, 1, 1, 0, 0, 1, 0, 0, 1, 1, 1, 1, 0, 1, 1, 0], bool)
        n = noise.make_noise({"type": "optimal_q", "scope": "device"}, mesh=mesh)
        out = np.asarray(jax.jit(n.fn)(self._sharded(mesh, x), mask=jnp.asarray(mask)))
        expected = x.copy()
        for start in range(0, 16, 2):
            rows = np.arange(start, start + 2)[mask[start:start + 2]]
            if rows.size:
                expected[rows] = published_optimal_q(x[rows])
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)

    def test_device_scope_from_ambient_mesh(self, mesh):
        x = np.random.default_rng(7).normal(size=(16, 2)).astype(np.float32)
        n = noise.make_noise({"type": "optimal_q", "scope": "device"})
        with jax.set_mesh(mesh):
            out = np.asarray(jax.jit(n.fn)(self._sharded(mesh, x)))
        expected = np.concatenate([published_optimal_q(s) for s in np.split(x, 8)])
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)

    def test_global_scope_equals_reference_on_whole_batch(self, mesh):
        x = np.random.default_rng(8).normal(size=(16, 3)).astype(np.float32)
        n = noise.make_noise({"type": "optimal_q", "scope": "global"}, mesh=mesh)
        out = np.asarray(jax.jit(n.fn)(self._sharded(mesh, x)))
        np.testing.assert_allclose(out, published_optimal_q(x), rtol=1e-5, atol=1e-6)

    @pytest.mark.parametrize("explicit_mesh", [True, False])
    def test_device_scope_salt_pepper_uses_shard_extremes(self, mesh, explicit_mesh):
        x = np.arange(16 * 4, dtype=np.float32).reshape(16, 4)
        cfg = {"type": "salt_pepper", "prob": 1.0, "scope": "device"}
        n = noise.make_noise(cfg, mesh=mesh if explicit_mesh else None)
        with jax.set_mesh(mesh):
            out = np.asarray(jax.jit(n.fn)(self._sharded(mesh, x), key=jax.random.key(0)))
        for shard_in, shard_out in zip(np.split(x, 8), np.split(out, 8)):
            assert set(np.unique(shard_out)) <= {shard_in.max(), shard_in.min()}

    def test_device_scope_devices_draw_different_noise(self, mesh):
        # Every shard holds the same values: only the key can tell them apart.
        x = np.tile(np.arange(2 * 64, dtype=np.float32).reshape(2, 64), (8, 1))
        n = noise.make_noise({"type": "salt_pepper", "prob": 0.5, "scope": "device"}, mesh=mesh)
        out = np.asarray(jax.jit(n.fn)(self._sharded(mesh, x), key=jax.random.key(0)))
        patterns = {np.split(out, 8)[i].tobytes() for i in range(8)}
        assert len(patterns) == 8

    @pytest.mark.parametrize("kind", ["gaussian", "within_image"])
    def test_per_sample_noise_ignores_scope_and_mesh(self, mesh, kind):
        # Noise that acts on each sample alone gives the same values on the
        # sharded batch as on one device, with the same key.
        x = np.random.default_rng(10).normal(size=(16, 4, 4, 2)).astype(np.float32)
        key = jax.random.key(3)
        alone = noise.make_noise({"type": kind, "scope": "global"}).fn(jnp.asarray(x), key=key)
        n = noise.make_noise({"type": kind, "scope": "device"}, mesh=mesh)
        sharded = jax.jit(n.fn)(self._sharded(mesh, x), key=key)
        np.testing.assert_allclose(sharded, alone, rtol=1e-6, atol=1e-6)


def test_device_scope_on_a_one_device_mesh_is_the_whole_batch():
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    x = np.random.default_rng(9).normal(size=(6, 2)).astype(np.float32)
    n = noise.make_noise({"type": "optimal_q", "scope": "device"}, mesh=mesh)
    np.testing.assert_allclose(n.fn(jnp.asarray(x)), published_optimal_q(x), rtol=1e-5, atol=1e-6)


def test_salt_pepper_leaves_an_all_padding_batch_finite():
    x = jnp.ones((4, 3))
    out = noise.salt_pepper_noise(x, key=jax.random.key(0), prob=1.0, mask=jnp.zeros(4, bool))
    np.testing.assert_array_equal(out, x)


class TestSettingsThatCannotWork:
    def test_within_image_rejects_an_unknown_q(self):
        with pytest.raises(ValueError, match="within_image q='optimum' is unknown"):
            noise.within_image_noise(jnp.ones((2, 4, 3, 2)), q="optimum")

    def test_within_image_refuses_input_without_rows(self):
        # (batch, features) has no image rows; mixing features would be another noise.
        with pytest.raises(ValueError, match=r"needs \(batch, rows, cols, ...\) input, got shape \(4, 6\)"):
            noise.within_image_noise(jnp.ones((4, 6)))

    def test_within_image_circulant_half_on_even_rows_names_the_rows(self):
        with pytest.raises(ValueError, match=r"even number of rows \(4, the grid"):
            noise.within_image_noise(jnp.ones((2, 4, 3, 2)), q="circulant", alpha=0.5)
        # Odd rows are invertible (det = 0.5^5 + 0.5^5): accepted, against numpy.
        x = np.random.default_rng(0).normal(size=(2, 5, 3, 2)).astype(np.float32)
        out = noise.within_image_noise(jnp.asarray(x), q="circulant", alpha=0.5)
        np.testing.assert_allclose(out, np.swapaxes(numpy_circulant(np.swapaxes(x, 0, 1), 0.5), 0, 1),
                                   rtol=1e-6, atol=1e-6)

    @pytest.mark.parametrize("field", ["strength", "mean", "std", "alpha"])
    @pytest.mark.parametrize("value", [float("nan"), float("inf")])
    def test_non_finite_settings_are_refused(self, field, value):
        with pytest.raises(ValueError, match=f"noise.{field}={value} is not a finite number"):
            noise.make_noise({"type": "gaussian", field: value})

    @pytest.mark.parametrize("prob", [np.float32(1.5), jnp.float32(-0.5)])
    def test_salt_pepper_checks_array_scalars_too(self, prob):
        with pytest.raises(ValueError, match="is not a probability"):
            noise.salt_pepper_noise(jnp.ones((2, 3)), key=jax.random.key(0), prob=prob)

    @pytest.mark.parametrize("fn", [noise.optimal_q_noise,
                                    lambda x: noise.circulant_noise(x, alpha=0.3),
                                    lambda x: noise.within_image_noise(x),
                                    lambda x: noise.gaussian_noise(x, key=jax.random.key(0))])
    def test_integer_input_is_refused(self, fn):
        with pytest.raises(ValueError, match="needs a floating-point input, got uint8"):
            fn(jnp.ones((2, 4, 4, 3), jnp.uint8))

    def test_device_scope_with_an_indivisible_batch_is_one_line(self):
        mesh = Mesh(np.array(jax.devices()), ("data",))
        fn = noise.make_noise({"type": "optimal_q", "scope": "device"}, mesh=mesh).fn
        with pytest.raises(ValueError, match=r"over 8 devices, but the batch has 12 examples; use "
                                             r"a batch divisible by 8, or noise.scope='global'"):
            fn(jnp.ones((12, 3)))

    def test_circulant_under_jit_with_a_traced_alpha(self, batch):
        out = jax.jit(noise.circulant_noise)(jnp.asarray(batch), alpha=0.4)
        np.testing.assert_allclose(out, numpy_circulant(batch, 0.4), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("real_rows", [301, 302])
@pytest.mark.parametrize("masked", [True, False])
def test_optimal_q_divides_by_the_exact_count_in_bfloat16(real_rows, masked):
    """bfloat16 holds integers exactly only up to 256: 301 real rows must
    divide by 302, not by bfloat16(301) + 1 = 301, and 302 by 303, not by
    bfloat16(303) = 304. Inputs of -1, 0 and 1 keep every sum exact in
    bfloat16, so the one rounding left is the final one, which is unbiased;
    a wrong count shifts every row by 0.3%."""
    rng = np.random.default_rng(5)
    rows = 320 if masked else real_rows
    x = rng.integers(-1, 2, size=(rows, 8)).astype(np.float32)
    mask = jnp.asarray(np.arange(rows) < real_rows) if masked else None
    exact = published_optimal_q(x[:real_rows].astype(np.float64))
    out = np.asarray(noise.optimal_q_noise(jnp.asarray(x, jnp.bfloat16), mask=mask), np.float64)
    nonzero = np.abs(exact) > 1e-9  # the float64 reference leaves ~1e-17 where it is 0
    relative = (out[:real_rows][nonzero] - exact[nonzero]) / exact[nonzero]
    assert np.abs(relative).max() <= 2.0**-8  # one bfloat16 rounding
    assert abs(relative.mean()) < 5e-4
    np.testing.assert_array_equal(out[real_rows:], x[real_rows:])  # padding untouched


@pytest.mark.parametrize("masked", [False, True])
def test_optimal_q_in_bfloat16_rounds_once(masked):
    """The batch sum and the mix run in float32 and only the result is
    rounded to bfloat16, so it is the exact mix of the bfloat16 inputs,
    correctly rounded (a sum rounded to bfloat16 first, and a bfloat16 add,
    left about half of them a step off)."""
    x = np.random.default_rng(6).uniform(0.5, 1.5, size=(300, 16)).astype(np.float32)
    half = jnp.asarray(x, jnp.bfloat16)
    mask = jnp.asarray(np.arange(300) < 290) if masked else None
    real = 290 if masked else 300
    exact = published_optimal_q(np.asarray(half, np.float64)[:real])
    out = np.asarray(noise.optimal_q_noise(half, mask=mask), np.float64)[:real]
    correctly_rounded = np.asarray(jnp.asarray(exact.astype(np.float32), jnp.bfloat16), np.float64)
    # float32 intermediates may tip a value lying within 1e-7 of a tie
    assert np.mean(out != correctly_rounded) <= 1e-3
    assert np.abs(out / exact - 1).max() <= 2.0**-8  # half a step at most


@pytest.mark.parametrize("fn", [noise.optimal_q_noise,
                                functools.partial(noise.circulant_noise, alpha=0.3),
                                functools.partial(noise.salt_pepper_noise, prob=0.1)])
def test_a_mask_of_the_wrong_length_is_named(fn):
    x = jnp.ones((4, 3))
    with pytest.raises(ValueError, match=r"mask has shape \(3,\) for a batch of 4"):
        fn(x, key=jax.random.key(0), mask=jnp.ones(3, bool))


def test_keep_leading_tokens_refuses_an_impossible_count():
    with pytest.raises(ValueError, match="n=-1 must be an integer >= 0"):
        noise.keep_leading_tokens(noise.optimal_q_noise, -1)
    wrapped = noise.keep_leading_tokens(noise.optimal_q_noise, 5)
    with pytest.raises(ValueError, match="n=5 leaves none of the 5 tokens"):
        wrapped(jnp.ones((2, 5, 3)))
