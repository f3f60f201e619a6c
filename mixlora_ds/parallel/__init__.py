"""Distributed concerns kept out of the model maths: sharding the frozen base across ranks."""
