"""Generated data in the public schemas: the demo's coloured-shapes scenes and small Italian text sets."""
