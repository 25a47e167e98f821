"""Datasets: sources that read what users download, the split, and the processed format."""
