"""Every loss against NumPy written from the formulas (explicit loops), with and without jit, plus the gradient
properties the algorithms rely on."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxagent import losses, objectives

N, T = 6, 24


def ragged(seed=0, n=N, t=T):
    """Random trajectories: padding at the end, env spans and model spans alternating, turns numbered."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((n, t), np.int32)
    turn = np.full((n, t), -1, np.int32)
    for i in range(n):
        length = rng.integers(t // 2, t + 1)
        pos, k = int(rng.integers(1, 4)), 0
        while pos < length:
            span = int(rng.integers(1, 5))
            mask[i, pos:min(pos + span, length)] = 1
            turn[i, pos:min(pos + span, length)] = k
            k += 1
            pos += span + int(rng.integers(1, 4))
    new = rng.normal(-2.0, 0.5, (n, t))
    old = new + rng.normal(0, 0.15, (n, t))
    ref = new + rng.normal(0, 0.2, (n, t))
    return mask, turn, new, old, ref


def np_policy_loss(new, old, mask, adv, turn, eps, clip, level, ref=None, kl=0.0, valid=None):
    low, high = (1 / (1 + eps), 1 + eps) if clip == "asymmetric" else (1 - eps, 1 + eps)
    total, count = 0.0, 0
    for i in range(new.shape[0]):
        idx = [t for t in range(new.shape[1]) if mask[i, t]]
        if not idx or (valid is not None and not valid[i]):
            continue
        a_of = (lambda t: adv[i, t]) if adv.ndim == 2 else (lambda t: adv[i])
        if level == "none":
            obj = sum(a_of(t) * new[i, t] for t in idx) / len(idx)
        elif level == "token":
            terms = []
            for t in idx:
                r = math.exp(new[i, t] - old[i, t])
                terms.append(min(r * a_of(t), min(max(r, low), high) * a_of(t)))
            obj = sum(terms) / len(terms)
        elif level == "trajectory":
            r = math.exp(sum(new[i, t] - old[i, t] for t in idx))
            obj = min(r * adv[i], min(max(r, low), high) * adv[i])
        else:
            turns = sorted({turn[i, t] for t in idx})
            terms = []
            for k in turns:
                r = math.exp(sum(new[i, t] - old[i, t] for t in idx if turn[i, t] == k))
                terms.append(min(r * adv[i], min(max(r, low), high) * adv[i]))
            obj = sum(terms) / len(terms)
        loss = -obj
        if kl:
            loss += kl * sum(math.exp(ref[i, t] - new[i, t]) - (ref[i, t] - new[i, t]) - 1 for t in idx) / len(idx)
        total += loss
        count += 1
    return total / count


def np_sft(logp, mask, weights=None, per="token"):
    rows = range(logp.shape[0])
    w = np.ones(logp.shape[0]) if weights is None else weights
    if per == "token":
        num = sum(-logp[i, t] * w[i] for i in rows for t in range(logp.shape[1]) if mask[i, t])
        den = sum(w[i] for i in rows for t in range(logp.shape[1]) if mask[i, t])
        return num / den
    per_row = [np.mean([-logp[i, t] for t in range(logp.shape[1]) if mask[i, t]]) for i in rows
               if w[i] and mask[i].any()]
    return np.mean(per_row)


def np_dpo(lc, mc, rc, lr, mr, rr, beta, nll):
    out = []
    for p in range(lc.shape[0]):
        chosen = sum(lc[p, t] - rc[p, t] for t in range(lc.shape[1]) if mc[p, t])
        rejected = sum(lr[p, t] - rr[p, t] for t in range(lr.shape[1]) if mr[p, t])
        z = beta * (chosen - rejected)
        loss = math.log1p(math.exp(-z))
        tokens = [lc[p, t] for t in range(lc.shape[1]) if mc[p, t]]
        loss += nll * (-sum(tokens) / max(len(tokens), 1))
        out.append(loss)
    return np.mean(out)


def np_critic_score(critic, ref, mask, turn, score):
    out = []
    for i in range(critic.shape[0]):
        idx = [t for t in range(critic.shape[1]) if mask[i, t]]
        if score == "trajectory_mean":
            out.append(np.mean([critic[i, t] - ref[i, t] for t in idx]))
        else:
            total = 0.0
            for k in sorted({turn[i, t] for t in idx}):
                total += np.mean([critic[i, t] - ref[i, t] for t in idx if turn[i, t] == k])
            out.append(total)
    return np.array(out)


J = jnp.asarray


class LossesTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_policy_loss_all_levels_and_clips(self):
        mask, turn, new, old, ref = ragged(0)
        rng = np.random.default_rng(1)
        adv = rng.normal(0, 0.5, N)
        valid = np.array([1, 1, 0, 1, 1, 1], bool)
        for level in ("token", "turn", "trajectory", "none"):
            for clip in ("asymmetric", "symmetric"):
                fn = self.variant(lambda *a, level=level, clip=clip: losses.policy_loss(
                    *a, epsilon=0.1, clip=clip, ratio_level=level, valid_N=J(valid)))
                total, count = fn(J(new), J(old), J(mask), J(adv), J(turn))
                expected = np_policy_loss(new, old, mask, adv, turn, 0.1, clip, level, valid=valid)
                np.testing.assert_allclose(total / count, expected, rtol=1e-5, err_msg=f"{level} {clip}")

    @chex.variants(with_jit=True, without_jit=True)
    def test_policy_loss_token_advantages_and_kl(self):
        mask, turn, new, old, ref = ragged(2)
        token_adv = np.random.default_rng(3).normal(0, 0.3, (N, T))
        fn = self.variant(lambda *a: losses.policy_loss(*a, epsilon=0.2, clip="symmetric", ref_logp_NxT=J(ref),
                                                        kl_coef=0.04))
        total, count = fn(J(new), J(old), J(mask), J(token_adv), J(turn))
        expected = np_policy_loss(new, old, mask, token_adv, turn, 0.2, "symmetric", "token", ref, 0.04)
        np.testing.assert_allclose(total / count, expected, rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_value_loss(self):
        mask, *_ = ragged(4)
        rng = np.random.default_rng(5)
        values, returns = rng.uniform(-0.3, 1.3, (N, T)), rng.uniform(0, 1, (N, T))
        total, count = self.variant(losses.value_loss)(J(values), J(returns), J(mask))
        expected = np.mean([np.mean([0.5 * (min(max(values[i, t], 0), 1) - returns[i, t]) ** 2
                                     for t in range(T) if mask[i, t]]) for i in range(N)])
        np.testing.assert_allclose(total / count, expected, rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_sft_loss(self):
        mask, _, new, *_ = ragged(6)
        weights = np.array([1, 0, 1, 1, 0, 1], np.float32)
        for per in ("token", "trajectory"):
            total, count = self.variant(lambda *a, per=per: losses.sft_loss(*a, per=per))(J(new), J(mask),
                                                                                          J(weights))
            np.testing.assert_allclose(total / count, np_sft(new, mask, weights, per), rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_dpo_loss(self):
        mc, _, lc, _, rc = ragged(7)
        mr, _, lr, _, rr = ragged(8)
        for beta, nll in ((0.1, 0.0), (0.5, 0.01)):
            fn = self.variant(lambda *a, beta=beta, nll=nll: losses.dpo_loss(*a, beta=beta, nll_coef=nll))
            total, count = fn(J(lc), J(mc), J(rc), J(lr), J(mr), J(rr))
            np.testing.assert_allclose(total / count, np_dpo(lc, mc, rc, lr, mr, rr, beta, nll), rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_bradley_terry_critic_loss_both_scores(self):
        mc, tc, cc, _, rc = ragged(9)
        mr, tr, cr, _, rr = ragged(10)
        for score in ("trajectory_mean", "turn_sum"):
            fn = self.variant(lambda *a, score=score: losses.bradley_terry_loss(*a, beta=0.1, score=score))
            total, count = fn(J(cc), J(rc), J(mc), J(cr), J(rr), J(mr), J(tc), J(tr))
            better = np_critic_score(cc, rc, mc, tc, score)
            worse = np_critic_score(cr, rr, mr, tr, score)
            expected = np.mean(np.log1p(np.exp(-(0.1 * better - 0.1 * worse))))
            np.testing.assert_allclose(total / count, expected, rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_turn_advantages(self):
        mask, turn, critic, _, ref = ragged(11)
        got, present = self.variant(losses.turn_advantages)(J(critic), J(ref), J(mask), J(turn))
        for i in range(N):
            for k in range(T):
                idx = [t for t in range(T) if mask[i, t] and turn[i, t] == k]
                assert bool(present[i, k]) == bool(idx)
                if idx:
                    np.testing.assert_allclose(got[i, k], np.mean([critic[i, t] - ref[i, t] for t in idx]),
                                               rtol=1e-5)


# ---- gradient properties --------------------------------------------------------------------------------------


def _grad_new(adv, new, old, mask, turn, **kw):
    def f(logp):
        total, count = losses.policy_loss(logp, J(old), J(mask), J(adv), J(turn), **kw)
        return total / count
    return np.asarray(jax.grad(f)(J(new)))


@pytest.mark.parametrize("level", ["token", "turn", "trajectory", "none"])
def test_masked_tokens_get_zero_gradient(level):
    mask, turn, new, old, _ = ragged(12)
    grad = _grad_new(np.random.default_rng(0).normal(0, 1, N), new, old, mask, turn, ratio_level=level)
    assert np.all(grad[mask == 0] == 0)
    assert np.any(grad[mask == 1] != 0)


@pytest.mark.parametrize("level", ["token", "turn", "trajectory", "none"])
def test_zero_advantage_gives_zero_policy_gradient(level):
    mask, turn, new, old, _ = ragged(13)
    assert np.all(_grad_new(np.zeros(N), new, old, mask, turn, ratio_level=level) == 0)


@pytest.mark.parametrize("clip", ["asymmetric", "symmetric"])
def test_tokens_past_the_clip_bound_on_the_clipped_side_get_zero_gradient(clip):
    low, high = losses.clip_bounds(0.1, clip)
    mask = np.ones((2, 4), np.int32)
    old = np.zeros((2, 4))
    # Row 0 has A > 0: ratios above `high` are clipped. Row 1 has A < 0: ratios below `low` are clipped.
    new = np.log(np.array([[high * 1.2, 1.0, high * 0.99, 0.5], [low * 0.8, 1.0, low * 1.01, 2.0]]))
    grad = _grad_new(np.array([1.0, -1.0]), new, old, mask, np.zeros((2, 4), np.int32), clip=clip)
    assert grad[0, 0] == 0 and grad[1, 0] == 0  # past the bound on the clipped side
    assert np.all(grad[0, 1:] != 0) and np.all(grad[1, 1:] != 0)  # inside, or past on the unclipped side


def test_long_and_short_trajectories_with_equal_advantage_weigh_equally():
    mask = np.zeros((2, 40), np.int32)
    mask[0, 2:6] = 1  # 4 model tokens
    mask[1, 2:38] = 1  # 36 model tokens
    logp = np.full((2, 40), -1.0)
    grad = _grad_new(np.array([0.5, 0.5]), logp, logp, mask, np.zeros((2, 40), np.int32))
    np.testing.assert_allclose(grad[0].sum(), grad[1].sum(), rtol=1e-6)
    assert abs(grad[0].sum()) > 0


def test_dpo_with_identical_chosen_and_rejected_has_zero_gradient():
    mask, _, logp, _, ref = ragged(14)

    def f(x):
        total, count = losses.dpo_loss(x, J(mask), J(ref), x, J(mask), J(ref), beta=0.1)
        return total / count

    assert np.all(np.asarray(jax.grad(f)(J(logp))) == 0)


def test_bad_names_are_refused():
    mask, turn, new, old, _ = ragged(15)
    with pytest.raises(ValueError, match="unknown ratio level 'step'; valid: token, turn, trajectory, none"):
        losses.policy_loss(J(new), J(old), J(mask), J(np.zeros(N)), ratio_level="step")
    with pytest.raises(ValueError, match="unknown clip mode 'both'; valid: asymmetric, symmetric"):
        losses.policy_loss(J(new), J(old), J(mask), J(np.zeros(N)), clip="both")
    with pytest.raises(ValueError, match="unknown loss 'ppo2'; valid: policy, value, sft, dpo, bradley_terry"):
        objectives.get_loss("ppo2")
