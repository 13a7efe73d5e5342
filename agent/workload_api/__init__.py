"""The Workload API: the peer-credential front and the SPIFFE Workload API servicer."""
