"""`lite-ft plan`: a run's peak memory and speed predicted before any weights are loaded, and fitted to a budget."""
