"""exchange: end-to-end encrypted hand-over of pre-release model artifacts, with a verifiable log."""

__version__ = "0.1.0"
