"""Reports: plots of accuracies and culprit grids."""
