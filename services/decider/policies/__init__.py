"""Sizing policies: the contract every policy keeps (``contract``), Dynamo's planner reproduced
exactly (``dynamo``) and ours (``slaplanner``). Policies are pure: they import no bus, no cluster
client and no metrics library (``tests/test_import_boundaries.py``)."""
