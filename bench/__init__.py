"""Benchmarks: tuneforge against other toolkits, one command each (see bench/README.md)."""
