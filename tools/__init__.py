"""Tools a developer runs on the repository itself (not imported by the pipeline): docs figures."""
