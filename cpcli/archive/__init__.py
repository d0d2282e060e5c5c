"""Session archives: each node's recorded files, the manifest, and collection."""
