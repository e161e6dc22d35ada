"""How commands speak: one way to build a parser (helptext), print rows (tables), say
what a scan did (summary; the daemon's log uses it too) and show progress."""
