"""sae-shards: find the directions in parameter space that RL fine-tuning reinforced.

A low-rank sparse autoencoder trains on the parameter-update deltas of an RL run; each decoder
direction is a candidate "shard". See docs/architecture.md for the map of the package.
"""

__version__ = "0.1.0"
