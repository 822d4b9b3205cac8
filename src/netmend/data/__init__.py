"""The data layer: checking and converting inputs, and streaming over them in chunks."""
