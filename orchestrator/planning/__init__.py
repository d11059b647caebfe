"""Planning: what is stale, the memory plan and its estimates, chunking, job preparation."""
