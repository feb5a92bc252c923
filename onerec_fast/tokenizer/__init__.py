"""Semantic-ID tokenizer (RQ-KMeans), item-embedding fusion, and lifelong-history compression."""

from onerec_fast.tokenizer.fusion import (
    collaborative_vectors,
    content_vectors,
    fuse_item_embeddings,
    mean_over_neighbours,
)
from onerec_fast.tokenizer.hierarchical import CompressedHistory, hierarchical_kmeans_compress
from onerec_fast.tokenizer.kmeans import KMeansResult, faiss_available, kmeans, resolve_kmeans_backend
from onerec_fast.tokenizer.rq_kmeans import RQKMeans, disambiguate

__all__ = [
    "CompressedHistory",
    "KMeansResult",
    "RQKMeans",
    "collaborative_vectors",
    "content_vectors",
    "disambiguate",
    "faiss_available",
    "fuse_item_embeddings",
    "hierarchical_kmeans_compress",
    "kmeans",
    "mean_over_neighbours",
    "resolve_kmeans_backend",
]
