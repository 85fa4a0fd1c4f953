"""The runtime process: server, scheduler, memory, executor (imports torch)."""
