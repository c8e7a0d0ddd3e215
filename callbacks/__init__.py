"""Lightning callbacks: thin adapters over the sparsetrain core."""

__all__: list[str] = []
