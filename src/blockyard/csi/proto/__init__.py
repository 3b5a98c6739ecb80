"""Generated CSI v1.12 protobuf and gRPC code (scripts/gen_protos.sh); do not edit."""
