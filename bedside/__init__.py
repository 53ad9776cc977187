"""Bedside: privacy-preserving AI at the point of care.

The core package (this one) holds what every side agrees on and imports none of the parts built on
it: privacy (clipping, noise, accountants, ledger), wire (envelope, signing), transport, schema,
manifest, config, errors and the CLI root. ``bedside.models``, ``bedside.edge``,
``bedside.aggregator`` and ``bedside.demo`` live in their own top-level folders.
"""

__version__ = "0.1.0"
