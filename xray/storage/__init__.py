"""Storage: bytes in and out (S3, local files, safe archive extraction, listings of images); no ML.
May use the core modules only (errors, config, environment)."""
