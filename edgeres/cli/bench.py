"""CLI commands (filled in by the owner of this area)."""
COMMANDS: list = []
