"""User-facing: the report, loading user factories, the command line."""
