"""MLflow: the tracker and its run names and params, the journal that survives an unreachable server, `ssau
upload`, a moved store's artifact root, and the artifacts a run leaves (tables, plots)."""
