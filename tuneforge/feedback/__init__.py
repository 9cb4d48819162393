"""Collecting human feedback: a SQLite store, a terminal loop, exports to training data."""
