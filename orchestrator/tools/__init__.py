"""Tools around jobs: clean, convert, and the tiny offline demo model."""
