"""BPF C sources; their compiled objects live in build/ (made by hatch_build.py)."""
