"""Cedar policy: the engine, its loading, request context, entities, reload and test cases."""
