"""The actor half of the engine: supervisor, worker pool, worker, process-tree control."""
