"""takeover-console: run, watch and test Socket Takeover (fds moved between processes with SCM_RIGHTS)."""

__version__ = "0.1.0"
