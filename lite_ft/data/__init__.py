"""Stage 3, the data: raw rows loaded and mapped to task fields (load), encoded by the task (tasks/), and batched
(batching)."""
