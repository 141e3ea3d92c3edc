"""The attribution methods ``ddm-hpc evaluate`` compares, each scoring every (query, cluster) pair.

Every method returns ``scores`` float32 [Q, K] on the run's k-means clusters with one convention:
**higher = more responsible** for the query's prediction (removing the cluster should change it
more; for the signed Dist2/LDS reading: removing it should raise the query's cross-entropy).
Methods other than DDM have one responsibility score; Dist1 and Dist2 locate its maximum and Dist3
(the *least* influential cluster) its minimum.

Rooms: ``base`` (the interface and the registry), one file per family of built-in methods:
``baselines`` (random, predict, clustering), ``ddm`` (ddm, ddm-match, ddm-soft, ddm-seq), ``tracin``
and ``trak`` (the peers, with what they share in ``peers``), and ``replay`` (exact metagradients, the
upper anchor; not in the default ``--methods``: it costs about two trainings per query). Importing this
package registers them, in the order of ``config.DEFAULT_METHODS``, replay last. A new method is one more
file (see ``base``).
"""
from ddm_hpc.methods.base import REGISTRY, AttributionMethod, MethodResult, describe, method, resolve, score_methods
from ddm_hpc.methods.baselines import cluster_means
from ddm_hpc.methods.ddm import read_ddm_scores, spread_to_clusters
from ddm_hpc.methods.peers import to_clusters
from ddm_hpc.methods.tracin import tracin_scores
from ddm_hpc.methods.trak import trak_scores
from ddm_hpc.methods.replay import query_objectives  # registers replay, after the default methods

__all__ = ["AttributionMethod", "MethodResult", "REGISTRY", "method", "resolve", "describe", "score_methods",
           "cluster_means", "read_ddm_scores", "spread_to_clusters", "to_clusters", "tracin_scores", "trak_scores",
           "query_objectives"]
