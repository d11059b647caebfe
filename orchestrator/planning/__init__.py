"""Planning: what is stale, the memory plan, its estimates and report, chunking, job preparation."""
