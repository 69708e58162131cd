"""Stage 5, export: a finished run folder read back (run_folder), merged and written as safetensors (merge,
streaming) or GGUF (gguf_export: the flow; gguf: the writer; gguf_vocab: the tokenizer; gguf_check and llama_cpp:
the checks in llama.cpp; ollama: the Modelfile), verified against the model as trained (verify), and described
(record)."""
