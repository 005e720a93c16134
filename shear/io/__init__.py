"""What goes to disk: checkpoints, safe archives, output folders that never lose a file, GGUF."""
