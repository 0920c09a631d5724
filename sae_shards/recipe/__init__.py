"""The built-in RL recipe ``sae-shards train`` runs: tiny models built locally, tasks and their
rewards, task balance, and the TRL GRPO / RLOO trainer builders (docs/architecture.md)."""
