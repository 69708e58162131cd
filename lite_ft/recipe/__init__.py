"""Stage 1, the recipe: YAML and overrides parsed once into typed objects (schema, load), checks of this machine
(preflight), and the device and precision a run computes in (precision)."""
