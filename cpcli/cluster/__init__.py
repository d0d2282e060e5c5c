"""The cluster: finding the manager (mDNS), placement and liveness, workers running their assignments."""
