"""Object re-identification: retrieval metrics (CMC, mAP, mINP) and k-reciprocal re-ranking."""

from dca_jax.reid.metrics import (distance_matrix, evaluate_features, evaluate_rank,
                                  evaluate_reranked, rank_stats, re_ranking, re_ranking_features,
                                  summarize)

__all__ = ['distance_matrix', 'evaluate_features', 'evaluate_rank', 'evaluate_reranked',
           'rank_stats', 're_ranking', 're_ranking_features', 'summarize']
