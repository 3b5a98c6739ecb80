"""The volume server process: engine volumes exported over iSCSI (more to come)."""
