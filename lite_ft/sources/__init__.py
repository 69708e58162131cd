"""Stage 2, the model's source: a Hub id, a local folder, a GGUF file or a catalog name, turned into something
`from_pretrained` loads (resolve), with the offline catalog (catalog) and the Hub reachability check (hub)."""
