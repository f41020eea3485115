"""unimm."""
