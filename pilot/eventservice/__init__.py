"""Event service: event ranges from the server, fed to a running payload (issue 12)."""
