"""The job: the config schema (``JobConfig``), the run directory's files, JSONL indexes, W&B,
versions, and ``run_job``, which wires the recipe and the capture (docs/architecture.md)."""
