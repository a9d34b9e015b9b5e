"""attnserve's serving side.

engine/  the core: request, scheduler, block manager (plain Python); runner, engine loop, outputs (torch)
api/     the front doors (gRPC, OpenAI-compatible HTTP, the explorer page) and what they share:
         validation, prompt building, serving, error kinds
app, config, metrics  process wiring
"""
