"""ssau: distributed semi-supervised training of facial action unit recognisers."""

__version__ = "0.1.0"
