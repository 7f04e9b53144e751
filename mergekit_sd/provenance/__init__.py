"""Provenance: the sdbuild record written into every output, the AUTOMATIC1111 / supermerger metadata codec,
lineage tables and their rendering, and recipe recovery from a file's metadata.
"""
