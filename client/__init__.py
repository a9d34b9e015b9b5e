"""attnserve's Python client: grpc and the generated stubs only (no torch)."""
