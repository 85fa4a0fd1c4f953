"""Frontend backends: the ZeroMQ client of the sglite runtime."""
