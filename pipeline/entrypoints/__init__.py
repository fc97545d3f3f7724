"""Entry points: the `dvd` command, the launcher, and the colocated baseline server."""
