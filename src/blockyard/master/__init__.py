"""The master: registry, placement, heartbeats, leases, assignments, failover and stores."""
