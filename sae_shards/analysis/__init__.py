"""Shards loaded back from a run: ``ShardSet`` and ``RunView``, shard families, interventions
(steering and ablation, scored by a built-in task or a user's ``RewardTask``), the shards' span
together, the logit lens and the HTML report (docs/analysis.md, docs/architecture.md)."""
