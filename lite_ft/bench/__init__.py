"""`lite-ft bench`: every method of a recipe in its own process (runner), compared in tables and plots (report)."""
