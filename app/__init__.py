"""mlapi: a production HTTP service for scikit-learn model packages."""

__version__ = "0.1.0"
