"""The job file: TOML to the resolved job, and prompt lists."""
