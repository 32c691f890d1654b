"""rbflow: real/bogus classification of image-subtraction candidates.

The library behind the rbflow Snakemake workflow. Every algorithm lives here; the
workflow's scripts only map Snakemake's inputs and outputs onto these functions.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
