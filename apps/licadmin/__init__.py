"""The administration side: ``licadmin`` talks to a server's license agent over any link URL."""

__all__: list[str] = []
