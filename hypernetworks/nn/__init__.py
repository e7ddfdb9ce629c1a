"""The paper's ideas as plain torch modules: no training code, no I/O."""
__all__: list[str] = []
