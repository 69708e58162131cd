"""Stage 4, training: the one loop for every method (loop), the step's loss (loss), checkpoints and the run folder
(checkpoint, rundir), and memory measurement (memory)."""
