"""The model layer: a functional view of the user's model, its checks, training and ascent."""
