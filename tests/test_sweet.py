"""Stage `sweet` (SWEET-RL's policy step): the critic's ranking decides which reply is chosen, the policy reads only
the agent's view and is scored on the judged turn alone, and the stage trains end to end after the critic."""

from __future__ import annotations

import json
import math
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest
from test_critic import CRITIC_MICRO, check_critic_record, offline_file  # noqa: F401 - offline_file: a fixture

from jaxagent.algorithms.sweet import ranked_pairs
from jaxagent.algorithms.turn_candidates import TurnPrefix, turn_trajectory, with_reply
from jaxagent.sweet_data import INFO_HEADER, critic_messages

from conftest import micro_train_command


@pytest.fixture(scope="module")
def tiny_renderer():
    from jaxagent.local_tokenizer import train_tokenizer
    from jaxagent.tokens import ChatRenderer

    return ChatRenderer(train_tokenizer([INFO_HEADER, "I WANT TO ANSWER: which units? metres def f(): return 1"] * 4,
                                        vocab_size=300))


PREFIX = TurnPrefix({"task": {"task_id": "t", "training_info": "def f(): return 1"}}, 0,
                    ({"role": "system", "content": "s"}, {"role": "user", "content": "u"}))


@pytest.mark.parametrize("seed", range(20))
def test_every_pair_takes_its_chosen_reply_from_the_better_half_and_its_rejected_from_the_worse(seed):
    rng = np.random.default_rng(seed)
    texts = [f"reply {i}" for i in range(16)]
    scores = rng.normal(size=16)
    scores[rng.integers(16)] = np.nan  # a reply the critic could not read takes no part
    pairs = ranked_pairs(texts, scores, 4, np.random.default_rng(seed), PREFIX)
    scored = np.sort(scores[~np.isnan(scores)])[::-1]
    cut = scored[len(scored) // 2 - 1]  # the lowest score of the better half
    assert len(pairs) == 4
    for _, chosen, rejected, better, worse in pairs:
        assert better >= cut > worse
        assert better == scores[texts.index(chosen)] and worse == scores[texts.index(rejected)]
    assert len({p[1] for p in pairs}) == 4 and len({p[2] for p in pairs}) == 4  # each reply used once


def test_identical_replies_never_make_a_pair_and_the_picks_vary_with_the_seed():
    texts = ["same"] * 8 + [f"other {i}" for i in range(8)]
    scores = np.arange(16.0)[::-1]  # the identical replies are the better half
    pairs = ranked_pairs(texts, scores, 4, np.random.default_rng(0), PREFIX)
    assert all(chosen != rejected for _, chosen, rejected, *_ in pairs)
    assert ranked_pairs(["a"] * 16, np.zeros(16), 4, np.random.default_rng(0), PREFIX) == []
    picks = {tuple(p[1] for p in ranked_pairs([str(i) for i in range(16)], np.arange(16.0), 4,
                                              np.random.default_rng(s), PREFIX)) for s in range(5)}
    assert len(picks) > 1  # random members of each half, not always the extremes


def test_the_judged_turn_alone_is_scored_and_only_the_critic_reads_the_reference(tiny_renderer):
    setup = SimpleNamespace(renderer=tiny_renderer, config=SimpleNamespace(rollout=SimpleNamespace(max_context=4096)))
    prefix = TurnPrefix(PREFIX.record, 1, (*PREFIX.messages, {"role": "assistant", "content": "which units?"},
                                           {"role": "user", "content": "metres"}))
    actor = turn_trajectory(setup, with_reply(prefix, "I WANT TO ANSWER: x"), "t")
    critic = turn_trajectory(setup, critic_messages({**prefix.record, "messages": with_reply(prefix, "I WANT TO "
                                                                                             "ANSWER: x")}), "t")
    for view in (actor, critic):
        scored = tiny_renderer.decode(view.token_ids[view.model_mask.astype(bool)])
        assert "I WANT TO ANSWER: x" in scored and "which units?" not in scored  # the earlier turn is context
        assert set(view.turn_index[view.model_mask.astype(bool)]) == {0}
    assert INFO_HEADER.strip() not in tiny_renderer.decode(actor.token_ids)
    assert INFO_HEADER.strip() in tiny_renderer.decode(critic.token_ids)


@pytest.mark.slow
def test_sweet_trains_the_policy_on_critic_ranked_replies_after_the_critic(offline_file, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    proc = subprocess.run(micro_train_command(
        run, *CRITIC_MICRO, "stages=[critic,sweet]", f"critic.data={offline_file}", "critic.replay=2",
        "critic.candidates=4", f"sweet.data={offline_file}", "sweet.trajectories=6", "sweet.candidates=4",
        "sweet.pairs_per_turn=2", "sweet.lr=1e-2", "sweet.epochs=2", "sweet.batch_size=8"),
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    critic = check_critic_record(run)  # the critic with the reference and the paper's per-turn score
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    sweet = next(r for r in records if r["kind"] == "train" and r["stage"] == "sweet")
    assert critic["replayed_turns"] == 2 and 0.0 <= critic["random_of_4_success"] <= critic["oracle_of_4_success"]
    assert critic["random_of_4_success"] <= critic["oracle_of_4_success"] >= critic["best_of_4_success"]
    assert json.loads((run / "stages" / "critic" / "critic.json").read_text()) == {"use_info": True,
                                                                                 "score": "turn_sum"}
    assert sweet["turns"] >= 6 and sweet["candidates"] == 4 * sweet["turns"] and sweet["pairs"] > 0, sweet
    assert sweet["advantage_gap"] > 0  # chosen replies scored higher by the critic than their rejected partners
    # The policy starts equal to its reference: DPO's first loss is log 2 plus the NLL term.
    assert math.log(2) < sweet["dpo_loss_first"] < math.log(2) + 0.01 * 20, sweet
    assert sweet["margin_accuracy"] > 0.5, sweet  # the updates raised chosen replies over rejected ones
    assert (run / "stages" / "sweet" / "result.json").is_file()


def test_sweet_without_a_finished_critic_stops_with_one_line(offline_file, tmp_path):  # noqa: F811
    proc = subprocess.run(micro_train_command(tmp_path / "run", "env.name=colbench", "stages=[sweet]",
                                              f"sweet.data={offline_file}", "sweet.trajectories=1",
                                              f"sweet.critic={tmp_path / 'nowhere'}"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "holds no finished critic" in proc.stderr.strip().splitlines()[-1], \
        proc.stderr[-2000:]
