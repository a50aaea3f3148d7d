"""`ssau compare`: methods x seeds x label drops x folds as child MLflow runs under one parent (command), the
grid and its cells (grid), and the report of means, standard deviations and paired differences (report)."""
