"""The version of the ``crosstask-client`` distribution."""

__version__ = "0.1.0"
