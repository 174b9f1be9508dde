"""The ARC method itself, independent of any model library: config, layers, sites, apply/merge, files, counts.

Import rule (checked by tests/test_architecture.py): nothing here imports a model library, PEFT, Fabric, or
another arcvit package than ``arcvit.errors`` and ``arcvit.fileio``. Backends register what the core needs.
"""
