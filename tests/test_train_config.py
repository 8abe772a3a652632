"""Training configurations: every shipped file loads; overrides are typed; bad keys, types and combinations fail
with one line naming the key; the command-line entry points turn them into one `error:` line and exit code 2."""

import os
import subprocess
import sys

import pytest

from jaxagent.config import CONFIG_DIR, ConfigError, LoopSection, TrainConfig, available_configs, load_config

SHIPPED = ["tiny", "tiny_grpo", "tiny_rloo", "tiny_ppo", "tiny_bandit", "tiny_turn", "loop_qwen7b", "loop_qwen32b"]


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_loads_and_starts_with_its_command(name):
    assert name in available_configs()
    config = load_config(name)
    assert isinstance(config, TrainConfig) and config.name == name
    first = (CONFIG_DIR / f"{name}.yaml").read_text().splitlines()[0]
    assert first.startswith("# ") and f"python -m jaxagent.train --config {name}" in first


def test_ablations_differ_from_tiny_only_where_they_say():
    tiny = load_config("tiny")
    assert tiny.stages == ("sft", "loop") and tiny.loop.ratio_level == "token"
    assert load_config("tiny_grpo").stages == ("sft", "grpo")
    assert load_config("tiny_rloo").stages == ("sft", "rloo")
    assert load_config("tiny_ppo").stages == ("sft", "ppo")
    assert load_config("tiny_bandit").loop.ratio_level == "trajectory"
    assert load_config("tiny_turn").loop.ratio_level == "turn"
    assert load_config("tiny_bandit").sft == tiny.sft and load_config("tiny_bandit").model == tiny.model


def test_paper_settings_of_loop_qwen32b():
    c = load_config("loop_qwen32b")
    assert (c.lora.enabled, c.lora.rank, c.lora.alpha) == (True, 16, 32.0)
    assert (c.loop.rollouts_per_task, c.loop.tasks_per_iteration, c.loop.epochs, c.loop.minibatch_size) == (6, 40, 2,
                                                                                                            32)
    assert (c.loop.epsilon, c.loop.min_abs_advantage, c.loop.kl_coef, c.loop.ratio_level) == (0.1, 0.01, 0.0, "token")
    assert (c.optim.lr, c.optim.schedule, c.optim.weight_decay) == (5e-5, "constant", 0.01)
    assert (c.rollout.max_turns, c.rollout.max_tokens_per_turn, c.rollout.max_context) == (40, 1500, 32768)
    assert c.rollout.temperature == 1.0 and c.env.name == "appworld"
    # The paper's split: training tasks of difficulty 1-2 (written by `python -m jaxagent.envs.appworld split`).
    assert (c.env.train_split, c.env.eval_split) == ("train_d12", "test_normal")
    # As apple/ml-loop evaluates and guards: greedy, 2 rollouts per task, every 5 iterations; KL stop at 20.
    assert (c.eval.temperature, c.eval.rollouts_per_task, c.eval.every, c.loop.kl_stop) == (0.0, 2, 5, 20.0)
    assert c.optim.max_grad_norm == 1.0  # the paper's value (the reference code's default is 0.1)
    small = load_config("loop_qwen7b")
    assert (small.lora.rank, small.lora.alpha) == (8, 16.0)  # the reference's 7B LoRA
    assert (small.eval.temperature, small.eval.rollouts_per_task, small.loop.kl_stop) == (0.0, 2, 20.0)


def test_overrides_are_typed_and_nested():
    c = load_config("tiny", ["loop.rollouts_per_task=4", "optim.lr=1e-5", "sft.optim.lr=2e-3", "stages=[sft]",
                             "rollout.deterministic=false", "lora.targets=[q, v]"])
    assert c.loop.rollouts_per_task == 4 and c.optim.lr == 1e-5 and c.sft.optim.lr == 2e-3
    assert c.stages == ("sft",) and c.rollout.deterministic is False and c.lora.targets == ("q", "v")
    assert isinstance(c.optim.lr, float) and isinstance(c.loop, LoopSection)


@pytest.mark.parametrize("overrides, words", [
    (["bogus.key=1"], ["unknown key 'bogus'", "valid keys of the top level", "loop"]),
    (["loop.bogus=1"], ["unknown key 'loop.bogus'", "rollouts_per_task"]),
    (["optim.lr=abc"], ["optim.lr", "expected a number", "'abc'"]),
    (["loop.iterations=2.5"], ["loop.iterations", "expected an integer"]),
    (["rollout.deterministic=maybe"], ["rollout.deterministic", "true or false"]),
    (["stages=[sft, dance]"], ["unknown stage 'dance'", "loop"]),
    (["stages=[loop, sft]"], ["sft must come first"]),
    (["loop.rollouts_per_task=1"], ["loop.rollouts_per_task=1", "at least 2"]),
    (["loop.minibatch_size=30", "loop.micro_batches=4"], ["loop.minibatch_size=30", "micro_batches=4"]),
    (["lora.enabled=true"], ["lora.enabled=true", "from scratch"]),
    (["optim.schedule=wavy"], ["optim.schedule='wavy'", "constant"]),
    (["rollout.max_turns=0"], ["rollout.max_turns=0"]),
    (["sft.mistake_rate=2"], ["sft.mistake_rate=2.0", "[0, 1]"]),
    (["optim"], ["not key=value"]),
    (["model.param_dtype=bfloat16"], ["model.param_dtype=bfloat16", "lora.enabled=true", "float32"]),
    (["eval.temperature=-0.5"], ["eval.temperature=-0.5", ">= 0"]),
    (["loop.kl_stop=-1"], ["loop.kl_stop=-1.0", ">= 0"]),
    # Sampling settings fail at start-up, not when the first episode starts after SFT.
    (["rollout.temperature=-1"], ["rollout.temperature=-1.0", ">= 0"]),
    (["rollout.top_p=0"], ["rollout.top_p=0.0", "(0, 1]"]),
    (["rollout.top_k=-3"], ["rollout.top_k=-3", ">= 0"]),
    (["eval.top_p=1.5"], ["eval.top_p=1.5", "(0, 1]"]),
    (["rollout.env_timeout_s=0"], ["rollout.env_timeout_s=0.0", "> 0"]),
    (["loop.epsilon=0"], ["loop.epsilon=0.0", "> 0"]),
    (["loop.clip=symmetric", "loop.epsilon=1"], ["loop.epsilon=1.0", "(0, 1)", "symmetric"]),
    (["loop.kl_coef=-0.1"], ["loop.kl_coef=-0.1", ">= 0"]),
    (["loop.min_abs_advantage=-1"], ["loop.min_abs_advantage=-1.0", ">= 0"]),
    (["optim.b2=1"], ["optim.b2=1.0", "[0, 1)"]),
    (["sft.optim.weight_decay=-0.1"], ["optim.weight_decay=-0.1", ">= 0"]),
    (["optim.eps=0"], ["optim.eps=0.0", "> 0"]),
])
def test_bad_configuration_names_the_key(overrides, words):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", overrides)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)


def test_unknown_config_name_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown config 'tinny'; valid names: .*tiny"):
        load_config("tinny")


def _cli(module, *args, env=None):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=300,
                          env=env)


@pytest.mark.parametrize("args, words", [
    (["--config", "tiny", "bogus.key=1"], ["unknown key 'bogus'"]),
    (["--config", "tiny", "optim.lr=abc"], ["optim.lr: expected a number, got 'abc'"]),
    (["--config", "loop_qwen7b"], ["no model folder", "JAXAGENT_MODEL_DIR", "huggingface-cli download"]),
    (["--config", "loop_qwen7b", "model.path=/nonexistent/qwen"], ["'/nonexistent/qwen'", "no config.json"]),
    (["--config", "tiny", "env.name=nowhere"], ["unknown environment 'nowhere'", "apptown"]),
])
def test_train_cli_errors_are_one_line(args, words, tmp_path):
    result = _cli("jaxagent.train", *args, f"run_dir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not (tmp_path / "run").exists()  # nothing was started


def test_appworld_without_official_data_says_how_to_get_it(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    env = {k: v for k, v in os.environ.items() if k != "APPWORLD_ROOT"}
    result = _cli("jaxagent.train", "--config", "loop_qwen7b", f"model.path={model}", f"run_dir={tmp_path / 'run'}",
                  env=env)
    assert result.returncode == 2
    assert result.stderr.startswith("error: env.options.data=official needs $APPWORLD_ROOT") and \
        "appworld download data" in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "run").exists()


def test_evaluate_cli_rejects_a_folder_that_is_not_a_run(tmp_path):
    result = _cli("jaxagent.evaluate", "--run", str(tmp_path))
    assert result.returncode == 2 and "is not a run folder" in result.stderr and result.stderr.count("\n") == 1
