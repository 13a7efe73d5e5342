"""The SPIFFE vocabulary that the server and the agent both speak.

Nothing here does I/O or imports gRPC: SPIFFE IDs, selectors, keys, X.509-SVIDs,
JWT-SVIDs and trust bundles, each valid by construction.
"""
