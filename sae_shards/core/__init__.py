"""The sparse autoencoder, on torch alone: targets and their shapes, ``SAEConfig``, sparsity,
``LowRankSAE`` (each latent a low-rank factorisation per weight matrix), ``SAETrainer``, the
losses of dense and factored per-event samples, metrics, planted streams and the checkpoint
files. Imports nothing else of sae_shards (docs/architecture.md)."""
