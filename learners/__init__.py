"""The slow path: trajectories in, weight updates out (rollouts, losses, the fold loop)."""

from learners.rollout import run_episodes

__all__ = ["run_episodes"]
