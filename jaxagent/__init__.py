"""jaxagent: reinforcement learning for multi-turn LLM agents in JAX."""
