"""Built-in analyses, registered as ordinary pluggy plugins."""
