"""Payload-side programs for HPC allocations: one job's event service spread over many nodes.

Nothing here is imported by the pilot: these modules run in the payload's environment (a
container, a site's Python with Ray installed), so they use only the standard library and,
lazily, Ray.  The pilot's side stays the event-range channel of ``pilot/eventservice/``: a
driver here is just an event-service payload whose workers happen to live on other nodes.

``raydriver``: ``python -m pilot.hpc.raydriver``, the payload that drives Ray actors;
``rayworker``: what one actor does with a batch of ranges; ``channel``: the payload's side
of the event-range channel (grammar, one connection, outputs written whole).
"""
