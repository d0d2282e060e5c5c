"""Node processes: the driver that runs one node, the supervisor that runs a host's nodes."""
