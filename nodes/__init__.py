"""ComfyUI node glue: schemas, validation, messages, calls into the pure modules."""
