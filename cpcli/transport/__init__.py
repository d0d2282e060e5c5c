"""ZeroMQ transport: wire format, data plane and control plane."""
