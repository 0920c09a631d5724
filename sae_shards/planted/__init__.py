"""The planted-shard benchmark: runs with known task structure, their ground truth, causal
tests and ``evaluate`` (docs/results.md, docs/architecture.md)."""
