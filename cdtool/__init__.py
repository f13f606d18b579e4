"""cdtool: a composable command-line toolbox for Custom Diffusion."""

__version__ = "0.1.0"
