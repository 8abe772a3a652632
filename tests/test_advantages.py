"""Advantage estimators and filters against NumPy written from the formulas (loops, not the JAX code)."""

from __future__ import annotations

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from jaxagent import advantages as adv

# Unequal groups, ids not contiguous, a singleton group, and a padding row.
GROUPS = np.array([3, 3, 3, 0, 0, 5, 5, 5, 5, 5, 2, 0])
VALID = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0], bool)


def _rewards(seed=0):
    return np.random.default_rng(seed).uniform(0, 1, len(GROUPS)).round(2)


def np_leave_one_out(rewards, groups, valid):
    out = np.zeros(len(rewards))
    for i in range(len(rewards)):
        if not valid[i]:
            continue
        others = [rewards[j] for j in range(len(rewards)) if j != i and valid[j] and groups[j] == groups[i]]
        out[i] = rewards[i] - np.mean(others) if others else 0.0
    return out


def np_group_mean(rewards, groups, valid):
    out = np.zeros(len(rewards))
    for i in range(len(rewards)):
        if valid[i]:
            members = [rewards[j] for j in range(len(rewards)) if valid[j] and groups[j] == groups[i]]
            out[i] = rewards[i] - np.mean(members)
    return out


def np_group_std(rewards, groups, valid):
    out = np.zeros(len(rewards))
    for i in range(len(rewards)):
        members = [rewards[j] for j in range(len(rewards)) if valid[j] and groups[j] == groups[i]]
        out[i] = np.std(members, ddof=1) if len(members) > 1 else 0.0
    return out


class AdvantagesTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_leave_one_out(self):
        rewards = _rewards()
        got = self.variant(adv.leave_one_out)(jnp.asarray(rewards), jnp.asarray(GROUPS), jnp.asarray(VALID))
        chex.assert_trees_all_close(got, np_leave_one_out(rewards, GROUPS, VALID), atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_group_mean(self):
        rewards = _rewards(1)
        got = self.variant(adv.group_mean)(jnp.asarray(rewards), jnp.asarray(GROUPS), jnp.asarray(VALID))
        chex.assert_trees_all_close(got, np_group_mean(rewards, GROUPS, VALID), atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_group_std_normalisation(self):
        """GRPO: (R - mean) / (sample std + 1e-4), as its common reference implementation (TRL) computes it."""
        rewards = _rewards(2)
        got = self.variant(adv.get_advantage("group_norm"))(jnp.asarray(rewards), jnp.asarray(GROUPS),
                                                            jnp.asarray(VALID))
        expected = np_group_mean(rewards, GROUPS, VALID) / (np_group_std(rewards, GROUPS, VALID) + 1e-4)
        chex.assert_trees_all_close(got, expected, atol=1e-4, rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_rwnorm_is_the_loop_references_population_std(self):
        """LOOP's "RwNorm" ablation as apple/ml-loop computes it, per task: adv / max(np.std(rets), 1e-7)."""
        rewards = _rewards(4)
        rewards[3:5] = 0.5  # a group whose rewards tie: std 0, advantages 0
        got = self.variant(adv.get_advantage("leave_one_out_norm"))(jnp.asarray(rewards), jnp.asarray(GROUPS),
                                                                    jnp.asarray(VALID))
        expected = np.zeros(len(rewards))
        for i in np.flatnonzero(VALID):
            rets = np.array([rewards[j] for j in np.flatnonzero(VALID) if GROUPS[j] == GROUPS[i]])
            if len(rets) > 1:
                others = (rets.sum() - rewards[i]) / (len(rets) - 1)
                expected[i] = (rewards[i] - others) / np.clip(np.std(rets), 1e-7, None)
        chex.assert_trees_all_close(got, expected, atol=1e-5, rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_keep_informative(self):
        values = np.array([0.5, -0.005, 0.01, -0.2, 0.0, 0.009, -0.01, 0.3])
        valid = np.array([1, 1, 1, 1, 1, 1, 1, 0], bool)
        got = self.variant(adv.keep_informative)(jnp.asarray(values), 0.01, jnp.asarray(valid))
        expected = [abs(v) >= 0.01 and ok for v, ok in zip(values, valid)]
        chex.assert_trees_all_equal(got, jnp.asarray(expected))

    @chex.variants(with_jit=True, without_jit=True)
    def test_gae_over_model_tokens_only(self):
        rng = np.random.default_rng(3)
        mask = np.array([[0, 0, 1, 1, 0, 0, 0, 1, 1, 1, 0, 0],
                         [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
                         [1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0]])
        values = rng.uniform(0, 1, mask.shape)
        token_rewards = np.zeros(mask.shape)
        for n, reward in enumerate([1.0, 0.3, 0.7]):
            token_rewards[n, np.nonzero(mask[n])[0][-1]] = reward
        for gamma, lam in ((1.0, 1.0), (0.9, 0.8)):
            got_adv, got_ret = self.variant(adv.gae, static_argnums=(3, 4))(
                jnp.asarray(token_rewards), jnp.asarray(values), jnp.asarray(mask), gamma, lam)
            expected_adv, expected_ret = np.zeros(mask.shape), np.zeros(mask.shape)
            for n in range(mask.shape[0]):
                steps = list(np.nonzero(mask[n])[0])  # the recursion runs over model tokens only
                running = 0.0
                for k in reversed(range(len(steps))):
                    t = steps[k]
                    next_value = values[n, steps[k + 1]] if k + 1 < len(steps) else 0.0
                    delta = token_rewards[n, t] + gamma * next_value - values[n, t]
                    running = delta + gamma * lam * running
                    expected_adv[n, t] = running
                    expected_ret[n, t] = running + values[n, t]
            chex.assert_trees_all_close(got_adv, expected_adv, atol=1e-5)
            chex.assert_trees_all_close(got_ret, expected_ret, atol=1e-5)

    def test_gae_with_gamma_lambda_one_is_reward_minus_value(self):
        mask = np.array([[0, 1, 1, 0, 1, 1]])
        values = np.array([[0.0, 0.2, 0.4, 0.0, 0.5, 0.9]])
        rewards = adv.terminal_rewards(jnp.asarray([0.8]), jnp.asarray(mask))
        np.testing.assert_allclose(rewards, [[0, 0, 0, 0, 0, 0.8]])
        got, returns = adv.gae(rewards, jnp.asarray(values), jnp.asarray(mask))
        np.testing.assert_allclose(got, [[0, 0.6, 0.4, 0, 0.3, -0.1]], atol=1e-6)
        np.testing.assert_allclose(returns, [[0, 0.8, 0.8, 0, 0.8, 0.8]], atol=1e-6)

    def test_finetuning_filters(self):
        rewards = np.array([1.0, 0.5, 1.0, 0.2, 1.0, 0.9, 0.9, 0.0])
        groups = np.array([0, 0, 0, 1, 1, 2, 2, 3])
        success = adv.keep_for_finetuning(jnp.asarray(rewards), jnp.asarray(groups), "success")
        np.testing.assert_array_equal(success, rewards >= 1.0)
        best = adv.keep_for_finetuning(jnp.asarray(rewards), jnp.asarray(groups), "best_of_group", threshold=0.9)
        np.testing.assert_array_equal(best, [1, 0, 0, 0, 1, 1, 0, 0])
        with pytest.raises(ValueError, match="unknown finetuning filter 'top'"):
            adv.keep_for_finetuning(jnp.asarray(rewards), jnp.asarray(groups), "top")

    def test_unknown_estimator_lists_valid_names(self):
        with pytest.raises(ValueError, match="unknown advantage estimator 'gea'; valid: leave_one_out"):
            adv.get_advantage("gea")
