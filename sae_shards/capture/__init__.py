"""Inside the RL run: ``ShardCallback`` (the TRL callback), the per-step delta sources and
per-event gradient capture, target selection, the ring buffer, TRL rollouts, the online SAE loop
and its runners, checkpoints and resumes, several processes (docs/architecture.md,
docs/scaling.md)."""
