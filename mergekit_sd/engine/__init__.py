"""The build engine: compute and object keys, the state database, the content-addressed store, the planner that
decides what is stale and why, the runner that streams tensors into the store, no-op stamps, lock files and replay.
"""
