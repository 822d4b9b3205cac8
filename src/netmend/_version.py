"""netmend's version: part of every cache key (:func:`netmend.store.run_settings`)."""

__version__ = "0.3.7"
