"""Client-side shims that route a framework's tool calls through Bastion."""
