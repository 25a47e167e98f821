"""cnnpipe: a labelled image dataset in, a served CNN classifier out."""

__version__ = "0.1.0"
