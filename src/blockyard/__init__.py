"""blockyard: replicated block storage for Kubernetes."""

__version__ = "0.1.0"
