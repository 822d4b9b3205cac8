"""The experiment kit: data sets, corruptions, reference models, the demo, bench and validation.

Nothing in the library (``netmend.api`` and below) imports from here.
"""
