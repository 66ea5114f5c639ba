"""Bastion: a secure inference server for machine-learning models."""

__version__ = "0.1.0"
