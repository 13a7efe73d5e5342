"""Alembic environment and versions: the only way the schema changes.

The runner is :mod:`ca.datastore.migrate`; its names stay reachable here.
"""

from ca.datastore.migrate import HERE, alembic_config, downgrade, upgrade

__all__ = ["HERE", "alembic_config", "downgrade", "upgrade"]
