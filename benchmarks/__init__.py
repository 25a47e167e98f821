"""cnnpipe's benchmarks: each module measures one thing and writes benchmarks/results/<name>.json (see
benchmarks/README.md). Run one as a module from the repository root: `python -m benchmarks.<name> --help`."""
