"""The slow path: trajectories in, weight updates out (rollouts, views, losses, masks, the fold loop)."""

from learners.fold import FoldConfig, FoldError, FoldItem, FoldResult, fold
from learners.losses import (
    chunked_generalized_jsd,
    chunked_head_loss,
    chunked_sampled_token_reverse_kl,
    chunked_topk_jsd,
    generalized_jsd,
    masked_mean,
    sampled_token_reverse_kl,
    token_jsd,
    topk_buckets,
    topk_jsd,
)
from learners.masks import (
    Segment,
    Source,
    accepted_mask,
    combine,
    completion_mask,
    judge_narrow,
    relevance_mask,
    special_token_mask,
    top_positions,
)
from learners.rollout import run_episodes
from learners.views import EpisodeViews, TokenView, episode_views

__all__ = [
    "EpisodeViews",
    "FoldConfig",
    "FoldError",
    "FoldItem",
    "FoldResult",
    "Segment",
    "Source",
    "TokenView",
    "accepted_mask",
    "chunked_generalized_jsd",
    "chunked_head_loss",
    "chunked_sampled_token_reverse_kl",
    "chunked_topk_jsd",
    "combine",
    "completion_mask",
    "episode_views",
    "fold",
    "generalized_jsd",
    "judge_narrow",
    "masked_mean",
    "relevance_mask",
    "run_episodes",
    "sampled_token_reverse_kl",
    "special_token_mask",
    "token_jsd",
    "top_positions",
    "topk_buckets",
    "topk_jsd",
]
