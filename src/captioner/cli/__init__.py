"""The `captioner` command."""
