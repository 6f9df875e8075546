"""Tools for testing code that speaks replication.

``synrepl.testing.strategies`` holds public hypothesis strategies (it needs
the ``testing`` extra: ``pip install synrepl[testing]``).
"""
