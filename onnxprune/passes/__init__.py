"""Built-in passes, one module each; they register themselves on import."""
