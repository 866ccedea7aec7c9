"""The External Configuration Service: owns the ring, starts servers, moves data, detects failures."""
