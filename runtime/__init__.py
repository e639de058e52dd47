"""Process-level settings every layer may use (logging, the host allocator): imports nothing of the project."""
