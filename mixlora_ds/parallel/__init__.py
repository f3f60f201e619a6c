"""Distributed concerns kept out of the model maths: sharding the frozen base across ranks.

Importing the package registers its gatherers (``gatherers.py``) with the model's ``partitioned``
interface: every process that builds or loads a partitioned model imports it.
"""

from mixlora_ds.parallel import gatherers  # noqa: F401
