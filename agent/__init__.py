"""The Sigil node agent: attests to the server, caches SVIDs, serves the Workload API."""
