"""Ready-made services built on `securetcp.TCPServer`."""
