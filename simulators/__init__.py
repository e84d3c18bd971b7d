"""Device simulators: drive the gateway without hardware, over the real protocol."""
