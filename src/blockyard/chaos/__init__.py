"""``blockyard chaos``: a seeded fault-injection harness and a block-level consistency checker,
run against a whole local cluster (master, volume servers, replication, the userspace
initiator). See docs/reliability.md."""
