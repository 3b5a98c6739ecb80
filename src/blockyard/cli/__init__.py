"""The ``blockyard`` command line: one module per verb."""
