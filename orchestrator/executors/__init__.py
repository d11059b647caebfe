"""Executors: the run flow, the local subprocess runner and the Ray executor, which run the unchanged stage processes."""
