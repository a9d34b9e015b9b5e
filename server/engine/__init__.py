"""The engine core: knows requests, tokens and the model, nothing of gRPC or HTTP."""
