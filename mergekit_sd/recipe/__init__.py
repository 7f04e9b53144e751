"""Recipes: YAML loaded with the safe loader and validated against the ops' declared fields, the DAG they form,
and the JSON Schema generated from the same declarations.
"""
