"""Stage 5, export: a finished run folder read back (run_folder), merged and written as safetensors (merge,
streaming) or GGUF (gguf), verified against the model as trained (verify), and described (record)."""
