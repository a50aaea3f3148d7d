"""Building and running a run: the method section resolved (setup), the training loop (trainer), the per-update
path (updates), optimisers and schedules, evaluation, and the bodies of `ssau train`, `eval`, `cv`, `demo` and `ui`."""
