"""Task networks built from hypernetworks.nn, registered by name (see registry.py)."""
