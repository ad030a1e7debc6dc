"""Starting Ray clusters for bulkgen: a local one for trying `--address` (local_cluster.py)."""
