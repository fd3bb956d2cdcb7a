"""Rewards for the RL algorithm tests (reward.type: callable, `algo_rewards:NAME`; tests/ is on the path)."""


def half_constant(prompts, responses):
    """0 for every reply to a prompt of even length (a group with nothing to learn), else a score that
    varies with the reply: dynamic sampling must drop the first kind of group."""
    return [0.0 if len(p) % 2 == 0 else (len(r) % 7) / 7 for p, r in zip(prompts, responses)]
