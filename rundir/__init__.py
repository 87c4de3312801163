"""One run's folder: who may write it (run_folder, lease), its checkpoints (checkpoint), the configuration a
checkpoint stores (run_config) and stopping for a requeue (preemption). Stands on util/ only; what it needs from
above (main.py's architecture flags) is passed in as arguments (docs/architecture.md)."""
