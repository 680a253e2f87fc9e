"""Optional bridges between FocalNet's modules and other libraries (each needs its own extra installed).

- :mod:`focalnet.integrations.ultralytics`: ``FocalModulation`` by name in Ultralytics model YAMLs
  (``pip install 'focalnet-train[detect]'``; Ultralytics is AGPL-3.0, the core framework does not need it).
"""
