"""mailhub: a mail transfer agent on Twisted.  C{__version__} is the one source of the version (setup.cfg reads it)."""

__version__ = "0.1.0"
