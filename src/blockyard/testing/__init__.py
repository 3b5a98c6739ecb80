"""Reusable test tools: conformance suites, fault injection and simple reference devices.

These ship inside the package (like ``trio.testing``) so every backend's tests can import the
same suites.
"""
