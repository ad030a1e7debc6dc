"""Throughput benchmark: bulkgen against the loops people write by hand (see README.md)."""
