"""attnserve's serving side: request, scheduler and block manager (plain Python);
runner and engine (torch); servicer, interceptors and metrics (grpc)."""
