"""Who is asking: JWT and API-key authentication, key sets, dev keys."""
