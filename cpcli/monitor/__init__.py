"""`cp monitor`: snapshots of the cluster (state), previews from the nodes (feed), how they look (view)."""
