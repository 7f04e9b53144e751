"""Beyond one machine: a shared S3-compatible object cache, and model inputs downloaded by URL and verified by sha256.

Sits below the engine: it moves files and checks bytes, and knows nothing of recipes or plans.
"""
