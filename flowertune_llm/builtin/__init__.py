"""The offline defaults: the built-in world (tasks and data) and the tiny models built from it."""
