"""Pictures: weight-activity text, kernel grids, handwriting, histograms."""
