"""bulkgen's replica side: the Ray actor, the generation engine, prompts and storage I/O."""
