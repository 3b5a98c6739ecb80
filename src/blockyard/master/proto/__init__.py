"""Generated gRPC/protobuf code of the master API (scripts/gen_protos.sh)."""
