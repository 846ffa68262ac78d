"""Benchmarks of cdc-bridge against its peers (``make bench``; see benchmarks/README.md)."""
